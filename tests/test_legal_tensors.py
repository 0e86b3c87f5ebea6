"""Legal tensors that used to cost the whole run its distributions.

Measuring one tensor raised inside the monitor's guard, which then reports scalars only
for every tensor, for the rest of the run: an empty ``(0, N)`` parameter with decoupled
decay (AdamW's default), and SGD's momentum buffer of a sparse gradient (a sparse tensor
itself).  Each tensor keeps its distribution, the empty one with count 0, and the SPEC §5
identity holds against the real step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.torch import optimizers  # noqa: E402
from lrscope.torch.state import elementwise_of  # noqa: E402
from tests.test_torch_optimizers import CASES, make_optimizer, recorded_before  # noqa: E402

#: The cases that step an empty tensor on the CPU (capturable ones need a GPU; torch's
#: Adafactor divides by the tensor's size: ZeroDivisionError in torch itself).
EMPTY_CASES = [case for case in CASES if not case[2].get("capturable") and case[1] is not torch.optim.Adafactor]


@pytest.mark.parametrize("case_id,cls,options,with_complex", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_an_empty_parameter_keeps_every_distribution(case_id, cls, options, with_complex):
    g = torch.Generator().manual_seed(0)
    shapes = {"vector": (5,), "matrix": (4, 3), "empty_rows": (0, 3), "empty": (0,)}
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for n, s in shapes.items()}
    optimizer = make_optimizer(cls, options, params)
    family = optimizers.family_of(optimizer)
    rtol = 1e-6 if isinstance(options.get("lr"), torch.Tensor) else 0  # a float32 lr: float32 step factors
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lrscope: measuring")  # "... the distributions failed"
        monitor = lrscope.watch(optimizer)
        for step in range(1, 4):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            before = {n: p.detach().clone() for n, p in params.items()}
            recorded = recorded_before(optimizer)
            optimizer.step()
            group = optimizer.param_groups[0]
            h, _ = optimizers.hyperparameters(family, group, group["lr"])
            report = monitor.last.groups[0]
            for index, (name, p) in enumerate(params.items()):
                el = elementwise_of(family, optimizer.state[p], p, h, recorded.get(id(p)))
                delta = p.detach() - before[name]
                predicted = -el.eta * el.direction - el.decay_rate * before[name]
                torch.testing.assert_close(delta, torch.as_tensor(predicted).expand(delta.shape),
                                           rtol=rtol, atol=1e-12)
                measured = report.params[f"param{index}"]
                assert measured.effective_lr is not None, f"{case_id}: {name} lost its distribution"
                assert measured.effective_lr.count == p.numel()
                if not p.numel():
                    assert (measured.update_norm, measured.param_norm, measured.update_to_param) == (0.0, 0.0, 0.0)
            assert report.effective_lr.count == 5 + 12
        monitor.close()
    lrscope.inspect(optimizer)  # raises what the guard would hide


SPARSE_MOMENTUM = [dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.9, dampening=0.1),
                   dict(momentum=0.9, maximize=True), dict(momentum=0.9, foreach=True)]


@pytest.mark.parametrize("options", SPARSE_MOMENTUM, ids=["momentum", "nesterov", "dampening", "maximize",
                                                          "foreach"])
def test_sgd_momentum_with_sparse_embedding_gradients(options):
    """torch's SGD keeps the momentum buffer of a sparse gradient sparse (its first buffer
    is a clone of the gradient, then ``mul_``/``add_`` of sparse tensors: the union of the
    rows seen so far) and adds ``-lr * buf`` to the parameter, so rows without a gradient on
    this step still move.  d is that buffer (with Nesterov, ``g + mu * buf``), eta = lr."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4, sparse=True).double()
    head = torch.nn.Linear(4, 1).double()
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lrscope: measuring")
        monitor = lrscope.watch(optimizer, model=model)
        for step in range(1, 5):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            rows = torch.tensor([step % 10, (3 * step) % 10, 7])
            optimizer.zero_grad()
            head(embedding(rows)).pow(2).sum().backward()
            optimizer.step()
            assert optimizer.state[embedding.weight]["momentum_buffer"].is_sparse
            report = monitor.last.groups[0]
            for name, el in lrscope.torch.elementwise(optimizer, model):
                delta = dict(model.named_parameters())[name].detach() - before[name]
                torch.testing.assert_close(delta, -el.eta * el.direction - el.decay_rate * before[name],
                                           rtol=0, atol=1e-15)
                measured = report.params[name]
                assert measured.effective_lr is not None, f"{name} lost its distribution"
                assert measured.effective_lr.count == delta.numel()
                assert measured.effective_lr.min == measured.effective_lr.max == 0.1
                assert measured.update_norm == pytest.approx(delta.norm().item(), rel=1e-12)
            # Rows met on an earlier step move on momentum alone.
            moved = (embedding.weight.detach() - before["embedding.weight"]).abs().sum(1) > 0
            assert int(moved.sum()) >= min(step, 2) + 1
        monitor.close()
    inspected = lrscope.inspect(optimizer, model=model).groups[0].params["embedding.weight"]
    assert inspected.effective_lr.count == 40 and np.isfinite(inspected.update_norm)


@pytest.mark.parametrize("batched", [True, False], ids=["tensors batched", "tensor by tensor"])
def test_an_empty_parameter_on_the_device_path(batched, monkeypatch):
    """The GPU code path (run on the CPU by treating it as a device) reduces an empty tensor
    too: min/max of no element are not taken on the device (``aminmax`` refuses them)."""
    from lrscope.torch import small as torch_small, stats as torch_stats

    monkeypatch.setattr(torch_stats, "on_host", lambda device: False)
    if not batched:
        monkeypatch.setattr(torch_small, "DEVICE_BATCH_ELEMENTS", 0)
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (0, 3), (5,)]]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lrscope: measuring")
        with lrscope.watch(optimizer) as monitor:
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                optimizer.step()
                report = monitor.last.groups[0]
                assert [report.params[f"param{i}"].effective_lr.count for i in range(3)] == [12, 0, 5]
                assert report.params["param1"].update_norm == 0.0
                assert report.effective_lr.count == 17
