"""schedulefree's ``ScheduleFreeWrapper`` and ``ScheduleFreeWrapperReference`` against their
real steps: watched through the optimizer they wrap, whose step is the z-step.

Per element, z's change is the base step's ``-eta * d - decay_rate * z'`` plus the wrapper's
decay at y (``z' = z - lr * weight_decay_at_y * y``, before the base step); the reported
``ckp1`` is the averaging weight the wrapper used (``weight_sum``'s growth over
``weight_sum``); a ``train()``/``eval()`` switch is no step.
"""

from __future__ import annotations

import math
import warnings

import pytest

from tests._optimizer_identity import FILTERS, assert_watch_does_not_change_training, package
from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope.torch.reader import TorchReader  # noqa: E402

pytestmark = FILTERS
schedulefree = package("schedulefree")
WRAPPERS = [schedulefree.ScheduleFreeWrapper, schedulefree.ScheduleFreeWrapperReference]
SHAPES = ((4, 3), (5,), (1,))  # (ScheduleFreeWrapper's swap cannot take a 0-d tensor)


class SignDescent(torch.optim.Optimizer):
    """An optimizer lrscope does not model: ``theta <- theta - lr * sign(g)``."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(torch.sign(p.grad), alpha=group["lr"])


def adamw(params):
    """torch's AdamW with its state made by one step of lr 0 on zero gradients: the
    wrapper's ``z`` in the state would make AdamW's first step skip its initialisation
    (``KeyError: 'exp_avg'`` from the real wrapper)."""
    base = torch.optim.AdamW(params, lr=0.0, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    base.step()
    base.param_groups[0]["lr"] = 0.01
    return base


BASES = {
    "adamw": adamw,
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.0),
    "unmodelled": lambda params: SignDescent(params, lr=0.01),
}


def _z(wrapper, p):
    """z now (the parameter itself before the first step, when the wrapper made no z)."""
    return wrapper.state[p].get("z", p).detach().clone()


def _close(got, want, tolerance, what):
    error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert error <= tolerance, f"{what}: off by {error} (tolerance {tolerance})"


def _check_z_step(reader, report, wrapper, z_before, y_before, decay_at_y_rate, step):
    """Per element, z's change is ``-eta * d - decay_rate * z' - lr * weight_decay_at_y * y``
    (``z'``: z as the base step found it, after the wrapper's decay at y), the base step's
    part is what lrscope rebuilds without a copy, and the report's eta extremes and update
    norms are those."""
    params = {reader.name_of(p): p for group in wrapper.param_groups for p in group["params"]}
    moved = [p for p in params.values() if p.grad is not None]
    checked = 0
    for name, el in reader.elementwise():
        p = params[name]
        z, after, y = z_before[id(p)], _z(wrapper, p), y_before[id(p)]
        before = z - decay_at_y_rate * y  # z'
        relative = 1e-12 if p.dtype == torch.float64 else 1e-5
        scale = max(z.abs().max().item(), y.abs().max().item(), 1e-300)
        tolerance = 8 * torch.finfo(p.dtype).eps * scale + relative * (after - z).abs().max().item()
        predicted = -el.eta * el.direction - el.decay_rate * before - decay_at_y_rate * y
        _close(after - z, predicted, tolerance, f"step {step} {name}: z's change")
        _close(after - before, el.update(after), tolerance, f"step {step} {name}: the base step")
        reported = report.groups[0].params[name]
        eta = torch.as_tensor(el.eta).double().expand(p.shape)
        assert reported.effective_lr.count == p.numel()
        assert math.isclose(reported.effective_lr.max, eta.max().item(), rel_tol=1e-6)
        assert math.isclose(reported.effective_lr.min, eta.min().item(), rel_tol=1e-6)
        norm = (after - before).double().norm().item()
        assert abs(reported.update_norm - norm) <= max(relative, 1e-6) * norm + tolerance * p.numel() ** 0.5
        checked += 1
    assert checked == len(moved)
    assert not [n for n in report.notes if "not modelled" in n or "unknown" in n], report.notes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("wrapper_cls", WRAPPERS, ids=lambda cls: cls.__name__)
def test_z_step_and_averaging_weight_against_the_real_step(wrapper_cls, base_name, dtype):
    modelled = base_name != "unmodelled"
    decay_at_y = 0.05 if modelled else 0.0
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in SHAPES]
    base = BASES[base_name](params)
    # An lr that rises and falls (lr_max is not the step's lr), and r > 0: the averaging
    # weights differ from step to step.
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda s: (0.5, 1.0, 0.25, 0.75)[s % 4])
    wrapper = wrapper_cls(base, momentum=0.9, weight_decay_at_y=decay_at_y, r=0.5)
    reader = TorchReader(wrapper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the unmodelled base is warned of)
        monitor = lrscope.watch(wrapper, findings=False, empirical=not modelled)
    with monitor:
        for step in range(1, 5):
            wrapper.train()
            for i, p in enumerate(params):
                skip = i == 1 and step == 3  # a tensor without gradient once
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.grad = None if skip else (noise * (1 + step % 3)).to(dtype)
            y_before = {id(p): p.detach().clone() for p in params}
            z_before = {id(p): _z(wrapper, p) for p in params}
            weight_sum = wrapper.param_groups[0].get("weight_sum", 0.0)
            wrapper.step()
            report, group = monitor.last, wrapper.param_groups[0]
            ckp1 = (group["weight_sum"] - weight_sum) / group["weight_sum"]
            assert math.isclose(report.groups[0].extra["ckp1"], ckp1, rel_tol=1e-12), (step, report.groups[0].extra)
            lr = group["lr"]
            assert report.groups[0].lr == lr
            if decay_at_y:
                assert report.groups[0].extra["weight_decay_rate_at_y"] == lr * decay_at_y
            if modelled:
                _check_z_step(reader, report, wrapper, z_before, y_before, lr * decay_at_y, step)
            else:  # the fallback measures the base step's realized change of z
                for p in params:
                    if p.grad is not None:
                        realized = report.groups[0].params[reader.name_of(p)].update_norm
                        z_change = _z(wrapper, p) - z_before[id(p)]
                        assert math.isclose(realized, z_change.double().norm().item(), rel_tol=1e-6)
            schedule.step()


@pytest.mark.parametrize("wrapper_cls", WRAPPERS, ids=lambda cls: cls.__name__)
def test_train_eval_switch_is_no_step(wrapper_cls):
    """``eval()`` moves the parameters to x, ``train()`` back to y, without a step: no report."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    wrapper = wrapper_cls(adamw([w]))
    with lrscope.watch(wrapper, findings=False) as monitor:
        wrapper.train()
        for _ in range(2):
            w.grad = torch.randn_like(w)
            wrapper.step()
        last = monitor.last
        y = w.detach().clone()
        wrapper.eval()
        assert not torch.equal(w.detach(), y)  # the parameters hold x now
        assert monitor.last is last
        wrapper.train()
        assert monitor.last is last and last.t == 3
    wrapper.eval()
    inspected = lrscope.inspect(wrapper)  # z from the state, whatever the parameters hold
    assert inspected.groups[0].extra["ckp1"] == last.groups[0].extra["ckp1"]
    assert inspected.groups[0].params["param0"].effective_lr.max == last.groups[0].params["param0"].effective_lr.max


@pytest.mark.parametrize("wrapper_cls", WRAPPERS, ids=lambda cls: cls.__name__)
def test_ckp1_of_steps_reported_on_access(wrapper_cls):
    """A step without distributions or sinks is reported when ``monitor.last`` is read,
    after the wrapper's step updated its keys: its ckp1 is the one the post-hook recorded."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    base = torch.optim.SGD([w], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda s: (0.5, 1.0, 0.25)[s % 3])
    wrapper = wrapper_cls(base, r=0.5)
    wrapper.train()
    with lrscope.watch(wrapper, every=100, findings=False) as monitor:
        for step in range(1, 5):
            w.grad = torch.randn_like(w)
            weight_sum = wrapper.param_groups[0].get("weight_sum", 0.0)
            wrapper.step()
            schedule.step()
            group = wrapper.param_groups[0]
            ckp1 = (group["weight_sum"] - weight_sum) / group["weight_sum"]
            assert math.isclose(monitor.last.groups[0].extra["ckp1"], ckp1, rel_tol=1e-12)


@pytest.mark.parametrize("wrapper_cls", WRAPPERS, ids=lambda cls: cls.__name__)
def test_watch_does_not_change_training(wrapper_cls):
    assert_watch_does_not_change_training(lambda params: wrapper_cls(adamw(params)), SHAPES)


@pytest.mark.parametrize("wrapper_cls", WRAPPERS, ids=lambda cls: cls.__name__)
def test_unknown_wrapper_attribute_is_reported_not_modelled(wrapper_cls):
    """An attribute the wrapper classes lrscope models do not have (another schedulefree
    release) makes the group's distributions and ckp1 unknown, said in the notes."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    wrapper = wrapper_cls(torch.optim.SGD([w], lr=0.1))
    wrapper.averaging = "new"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lrscope.watch(wrapper, findings=False) as monitor:
            wrapper.train()
            w.grad = torch.randn_like(w)
            wrapper.step()
    report = monitor.last
    assert any("averaging='new'" in note and "not modelled" in note for note in report.notes), report.notes
    assert report.groups[0].effective_lr is None
    assert "ckp1" not in report.groups[0].metrics()  # (NaN: unknown)
