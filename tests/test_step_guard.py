"""Measuring never raises into ``optimizer.step()`` (item 9 of the defects issue).

Hyperparameters outside the range lrscope models (a momentum schedule reaching beta1 = 1),
a param group holding a value lrscope cannot read, or an error inside lrscope itself: the
step runs as without lrscope (parameters bitwise identical), one warning says what could
not be measured, and the report carries what could (NaN where unknown).
"""

from __future__ import annotations

import math
import warnings

import pytest

from tests.conftest import CollectSink, require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.torch.reader import TorchReader  # noqa: E402

STEPS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(make, change, monitor_options=None):
    """Parameters after STEPS steps of ``make(params)``, ``change(optimizer, k)`` before
    step k, watched with ``monitor_options`` (None: unwatched); and the reports."""
    model = _model()
    optimizer = make(model.parameters())
    collect = CollectSink()
    monitor = None
    if monitor_options is not None:
        monitor = lrscope.watch(optimizer, model=model, sinks=[collect], **monitor_options)
    for k in range(STEPS):
        change(optimizer, k)
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    if monitor is not None:
        monitor.close()
    return [p.detach().clone() for p in model.parameters()], collect.reports


def _bitwise_equal(a, b):
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


def _momentum_schedule(optimizer, k):
    """beta1 reaches 1.0 for steps 3 and 4, then comes back."""
    beta1 = 1.0 if k in (2, 3) else 0.9
    optimizer.param_groups[0]["betas"] = (beta1, 0.999)


OPTIMIZERS = {
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("name", ["nadam", "adam-fused"])  # (torch's for-loop Adam divides by 0)
def test_beta1_reaching_one_mid_run_does_not_raise_into_step(name, every):
    make = OPTIMIZERS[name]
    plain, _ = _train(make, _momentum_schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, reports = _train(make, _momentum_schedule, {"every": every})
    assert _bitwise_equal(plain, watched)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    about = [m for m in messages if "beta1" in m]
    assert len(about) == 1, messages  # once, not on every step
    assert [r.t for r in reports] == list(range(1, STEPS + 1))
    for report in reports:
        group = report.groups[0]
        assert group.lr == 1e-2
        if report.t in (3, 4):
            assert math.isnan(group.step_size) and math.isnan(group.weight_decay_rate)
            assert group.effective_lr is None
            assert any("beta1" in note for note in report.notes)
        else:
            assert math.isfinite(group.step_size)
    # Back in range, the distributions come back: one bad step disables nothing for good.
    assert reports[-1].groups[0].effective_lr is not None or every == 2
    assert reports[4].groups[0].effective_lr is not None  # t = 5 is measured with every 1 and 2


def test_a_param_group_with_a_value_lrscope_cannot_read():
    """A schedule's per-group table (a tensor of several elements) in an Adam group: torch's
    step ignores it; lrscope's option check asked the tensor for its truth value."""

    def add_table(optimizer, k):
        if k == 1:
            optimizer.param_groups[0]["lr_table"] = torch.linspace(1e-3, 1e-2, 4)

    make = OPTIMIZERS["adam"]
    plain, _ = _train(make, add_table)
    with pytest.warns(RuntimeWarning, match="lr_table"):
        watched, reports = _train(make, add_table, {})
    assert _bitwise_equal(plain, watched)
    assert [r.t for r in reports] == list(range(1, STEPS + 1))
    assert reports[-1].groups[0].lr == 1e-2
    assert any("lr_table" in note and "not modelled" in note for note in reports[-1].notes)


def test_an_lr_that_is_not_a_number():
    """An optimizer lrscope does not model with ``lr=None`` (as transformers' Adafactor keeps
    with relative_step=True, computing its own lr): lr is unknown, not an error."""

    class RelativeStep(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": None})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-1e-2)

    plain, _ = _train(RelativeStep, lambda optimizer, k: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched, reports = _train(RelativeStep, lambda optimizer, k: None, {"empirical": True})
    assert _bitwise_equal(plain, watched)
    group = reports[-1].groups[0]
    assert math.isnan(group.lr) and math.isnan(group.step_size)
    assert group.update_magnitude is not None  # the realized update is still measured
    assert any("lr" in note and "None" in note for note in reports[-1].notes)


@pytest.mark.parametrize("every", [1, 3])
def test_an_error_inside_lrscope_never_reaches_the_step(monkeypatch, every):
    """Fault injection: building the report raises on every path (distributions and scalars
    alike).  The step is untouched, one warning, and each step still reports t and lr."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("lrscope bug")

    make = OPTIMIZERS["adam"]
    plain, _ = _train(make, lambda optimizer, k: None)
    monkeypatch.setattr(TorchReader, "_finish", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, reports = _train(make, lambda optimizer, k: None, {"every": every})
    assert _bitwise_equal(plain, watched)
    about = [str(w.message) for w in caught if "lrscope bug" in str(w.message)]
    assert 1 <= len(about) <= 2  # the distributions' failure, then the scalars' (once each)
    assert [r.t for r in reports] == list(range(1, STEPS + 1))
    for report in reports:
        (group,) = report.groups
        assert group.lr == 1e-2 and math.isnan(group.step_size)
        assert any("lrscope bug" in note for note in report.notes)


def test_the_lazy_report_and_a_skipped_step_are_guarded_too(monkeypatch):
    """``monitor.last`` builds the scalars on access when no sink wants them."""
    make = OPTIMIZERS["adam"]
    model = _model()
    optimizer = make(model.parameters())
    monitor = lrscope.watch(optimizer, every=100)
    for k in range(3):
        model(torch.randn(4, 5)).sum().backward()
        optimizer.step()
    monkeypatch.setattr(TorchReader, "_finish", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("lrscope bug")))
    model(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="lrscope bug"):
        report = monitor.last
    assert report.t == 4 and report.groups[0].lr == 1e-2 and math.isnan(report.groups[0].step_size)
    monitor.close()


class LoggedAdamW(torch.optim.AdamW):
    """A subclass whose step() calls its parent's, raising when asked to (as schedule-free
    optimizers raise outside train mode): torch runs the step hooks around each step()."""

    fail = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("not in train mode")
        return super().step(closure)


def test_a_subclass_calling_its_parents_step_is_one_step():
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch wraps AdamW.step on first use
    model = _model()
    optimizer = LoggedAdamW(model.parameters(), lr=1e-2)
    collect = CollectSink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = lrscope.watch(optimizer, sinks=[collect])
    for k in range(5):
        model(torch.randn(4, 5)).sum().backward()
        optimizer.fail = k == 2
        try:
            optimizer.step()
        except RuntimeError:
            assert k == 2
    monitor.close()
    assert [r.t for r in collect.reports] == [1, 2, 3, 4]  # one report per step taken
