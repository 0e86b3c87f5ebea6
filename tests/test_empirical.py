"""What a user gets for a step lrscope reads without a hook, or for an optimizer it does
not model: ``lrscope.torch.elementwise`` right after ``step()`` (no bare KeyError), and
the measured (empirical) mode in every framework with a monitor and in the callbacks."""

from __future__ import annotations

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.torch import reader as backend  # noqa: E402
from lrscope.torch.state import elementwise_of  # noqa: E402


def adafactor_params(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"vector": (5,), "matrix": (4, 3), "cube": (2, 3, 4)}
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for n, s in shapes.items()}
    # RMS(theta) below eps2 = 1e-3: the step is scaled by eps2, not by the RMS.
    params["tiny"] = torch.nn.Parameter(1e-5 * torch.randn(6, generator=g, dtype=dtype))
    return params, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("options", [dict(lr=0.01), dict(lr=0.5, weight_decay=0.1, maximize=True, d=2.0)],
                         ids=["plain", "wd-maximize-clip"])
def test_elementwise_of_adafactor_right_after_step(options, dtype):
    """torch's Adafactor scales its step by RMS(theta before the step), which the step
    overwrites and a hook records (watch); ``elementwise`` without one recovers it from
    theta after the step (one quadratic, as for Keras' Adafactor) and satisfies the
    identity against the real step, with the eta of the recorded RMS."""
    params, g = adafactor_params(dtype)
    optimizer = torch.optim.Adafactor(params.values(), **options)
    relative = 1e-10 if dtype == torch.float64 else 2e-5
    for step in range(1, 5):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        before = {n: p.detach().clone() for n, p in params.items()}
        recorded = backend.TorchReader(optimizer).begin(0, distributions=True).recorded
        optimizer.step()
        got = dict(lrscope.torch.elementwise(optimizer))
        group = optimizer.param_groups[0]
        h, _ = backend.hyperparameters("adafactor", group, group["lr"])
        for index, (name, p) in enumerate(params.items()):
            el = got[f"param{index}"]
            delta = (p.detach() - before[name]).double()
            predicted = (-el.eta * el.direction - el.decay_rate * before[name]).double()
            torch.testing.assert_close(delta, predicted, rtol=0, atol=relative * delta.abs().max().item())
            exact = elementwise_of("adafactor", optimizer.state[p], p, h, recorded[id(p)])
            torch.testing.assert_close(el.eta, exact.eta, rtol=relative, atol=0)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].params["param1"].effective_lr.count == 12 and not any(
        "not recorded" in note for note in report.notes)


def test_elementwise_of_adadelta_says_what_it_needs():
    """Adadelta's eta reads the accumulated deltas from before the step, which the step
    overwrote: a clear error naming watch(), not a bare KeyError."""
    w = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = torch.optim.Adadelta([w])
    w.grad = torch.randn(3, 4)
    optimizer.step()
    with pytest.raises(ValueError, match=r"Adadelta.*before the step.*watch\("):
        dict(lrscope.torch.elementwise(optimizer))
