"""SPEC §6 "Unknown is NaN, never a guess".

A scalar lrscope cannot know (the step size and decay rate of an optimizer it does not
model) is NaN in the report and absent from every log; ``lr`` is the value the step used,
and where an optimizer publishes an applied lr other than its ``lr`` key (schedule-free's
``scheduled_lr``, Prodigy's and D-Adaptation's ``d * lr``), the report uses it and names it
in ``lr_source``.  Measured statistics keep their NaN and inf.
"""

from __future__ import annotations

import csv
import io
import math
import warnings

import numpy as np
import pytest

from tests.conftest import CollectSink, require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.logs import read_jsonl  # noqa: E402
from lrscope.report import Distribution, GroupReport, ParamReport, StepReport  # noqa: E402
from lrscope.sinks import ConsoleSink, CsvSink  # noqa: E402

UNKNOWN = ("step_size", "weight_decay_rate")


class AdamWLogged(torch.optim.AdamW):
    """An AdamW subclass overriding step() (to log, to clip, ...): lrscope cannot know that
    its step is AdamW's, so it must not report AdamW's step size or decay rate."""

    @torch.no_grad()
    def step(self, closure=None):
        return super().step(closure)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _train(model, optimizer, steps, seed=0):
    for k in range(steps):
        g = torch.Generator().manual_seed(seed + k)
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        y = torch.randn(16, 2, generator=g, dtype=torch.float64)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _quiet_watch(optimizer, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lrscope.watch(optimizer, **options)


def test_an_unmodelled_optimizer_logs_no_step_size_or_decay_rate(tmp_path):
    """An AdamW subclass: its true step size at t = 3 is about 2.0e-4 and its decay rate
    1e-4; lrscope reported 1e-3 and 0 as if measured, to TensorBoard, CSV and JSONL."""
    model = _model()
    optimizer = AdamWLogged(model.parameters(), lr=1e-3, weight_decay=0.1)
    collect = CollectSink()
    monitor = _quiet_watch(optimizer, log_dir=tmp_path, sinks=[CsvSink(tmp_path / "lrscope.csv"), collect])
    _train(model, optimizer, 3)
    monitor.close()

    group = collect.reports[-1].groups[0]
    assert group.lr == 1e-3 and group.lr_source == "lr"
    assert math.isnan(group.step_size) and math.isnan(group.weight_decay_rate)
    scalars = collect.reports[-1].scalars()
    assert scalars["lr-AdamWLogged/pg0/lr"] == 1e-3
    assert not [tag for tag in scalars if tag.rsplit("/", 1)[1] in UNKNOWN]

    rows = list(csv.reader(io.StringIO((tmp_path / "lrscope.csv").read_text())))
    assert rows[0] == ["step", "wall_time", "tag", "value"] and all(len(row) == 4 for row in rows)
    tags = {row[2] for row in rows[1:]}
    assert "lr-AdamWLogged/pg0/lr" in tags and not [t for t in tags if t.rsplit("/", 1)[1] in UNKNOWN]

    records = list(read_jsonl(tmp_path / "lrscope.jsonl"))
    assert len(records) == 3
    for record in records:
        (entry,) = record["groups"]
        assert entry["lr"] == 1e-3 and entry["lr_source"] == "lr"
        assert entry["step_size"] is None and entry["weight_decay_rate"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert "lr-AdamWLogged/pg0/lr" in logged
    assert not [t for t in logged if t.rsplit("/", 1)[1] in UNKNOWN]


def test_lrscope_plot_draws_a_log_without_step_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    from lrscope.cli import main

    model = _model()
    optimizer = AdamWLogged(model.parameters(), lr=1e-3, weight_decay=0.1)
    with _quiet_watch(optimizer, log_dir=tmp_path, empirical=True):
        _train(model, optimizer, 4)
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").stat().st_size > 0


def test_the_report_types_default_to_unknown():
    """By construction: only a modelled family sets a step size or decay rate."""
    group = GroupReport(name="pg0", lr=0.1)
    assert math.isnan(group.step_size) and math.isnan(group.weight_decay_rate)
    assert group.lr_source == "lr"
    report = StepReport(t=1, optimizer="Muon", framework="torch", family=None, groups=[group])
    assert report.scalars() == {"lr-Muon/pg0/lr": 0.1}
    entry = report.to_dict()["groups"][0]
    assert math.isnan(entry["step_size"]) and entry["lr_source"] == "lr"
    combined = GroupReport.combine({}, name="pg0", lr=0.1)
    assert math.isnan(combined.step_size) and math.isnan(combined.weight_decay_rate)


def test_measured_nan_and_inf_statistics_are_logged_as_measured():
    """Only the group's scalars mean "unknown" by NaN: a distribution whose elements are all
    NaN, or an update ratio that is infinite (a zero tensor moved), are measurements."""
    param = ParamReport(name="w", shape=(2,), effective_lr=Distribution.from_array(np.array([np.nan, np.nan])),
                        update_norm=1.0, param_norm=0.0)
    group = GroupReport.combine({"w": param}, name="pg0", lr=0.1, step_size=0.1, weight_decay_rate=0.0)
    scalars = StepReport(t=1, optimizer="SGD", framework="torch", family="sgd", groups=[group]).scalars()
    assert scalars["lr-SGD/pg0/update_to_param"] == math.inf
    assert scalars["lr-SGD/pg0/effective_lr/nonfinite"] == 2
    assert math.isnan(scalars["lr-SGD/pg0/effective_lr/mean"])
    assert scalars["lr-SGD/pg0/weight_decay_rate"] == 0.0


def test_the_console_says_n_a_for_an_unknown_step_size():
    from rich.console import Console

    out = io.StringIO()
    sink = ConsoleSink(every=1, console=Console(file=out, width=120))
    sink.write(StepReport(t=1, optimizer="Muon", framework="torch", family=None,
                          groups=[GroupReport(name="pg0", lr=0.02)]))
    row = out.getvalue().splitlines()[-1].split()
    assert row[:4] == ["1", "pg0", "2.00e-02", "n/a"]


# Optimizers that publish the lr their step applied (item 3 of the defects issue).


class WarmupSGD(torch.optim.Optimizer):
    """SGD with a linear warmup applied inside step(), publishing the warmed-up lr as
    schedule-free optimizers do: ``scheduled_lr`` is written by the step that uses it."""

    def __init__(self, params, lr, warmup_steps):
        super().__init__(params, {"lr": lr, "warmup_steps": warmup_steps, "k": 0, "scheduled_lr": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"] * min(1.0, (group["k"] + 1) / group["warmup_steps"])
            group["scheduled_lr"] = lr
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
            group["k"] += 1


class DistanceSGD(torch.optim.Optimizer):
    """SGD scaled by a distance estimate ``d`` as Prodigy and D-Adaptation do: the step
    applies ``d * lr`` with the ``d`` it found in the group, then updates ``d`` for the
    next step."""

    def __init__(self, params, lr, d0):
        super().__init__(params, {"lr": lr, "d": d0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            applied = group["d"] * group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-applied)
            group["d"] *= 1.5


def _sgd_lr(model, optimizer, seed):
    """The lr a plain-gradient step really applied, from the parameters' change."""
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, 1, seed)
    p, b = next(iter(model.parameters())), before[0]
    moved = p.grad.abs() > 1e-6
    return float(((b - p.detach())[moved] / p.grad[moved]).median())


@pytest.mark.parametrize("make, source", [
    (lambda ps: WarmupSGD(ps, lr=0.1, warmup_steps=4), "scheduled_lr"),
    (lambda ps: DistanceSGD(ps, lr=0.1, d0=1e-2), "d*lr"),
], ids=["scheduled_lr", "d"])
def test_a_published_applied_lr_is_the_reported_lr(make, source):
    model = _model()
    optimizer = make(model.parameters())
    collect = CollectSink()
    monitor = _quiet_watch(optimizer, sinks=[collect])
    applied = [_sgd_lr(model, optimizer, seed) for seed in range(5)]
    monitor.close()
    assert len(set(np.round(applied, 12))) > 2  # the applied lr changes, the 'lr' key does not
    for report, lr in zip(collect.reports, applied):
        group = report.groups[0]
        assert group.lr == pytest.approx(lr, rel=1e-9) and group.lr_source == source
        assert math.isnan(group.step_size)
        assert any(source in note for note in report.notes)
        assert report.scalars()["lr-" + type(optimizer).__name__ + "/pg0/lr"] == group.lr
        assert report.to_dict()["groups"][0]["lr_source"] == source
    if source == "d*lr":
        assert [r.groups[0].extra["d"] for r in collect.reports] == pytest.approx(
            [1e-2 * 1.5**k for k in range(5)])


def test_inspect_says_that_d_read_after_the_step_is_the_next_steps():
    model = _model()
    optimizer = DistanceSGD(model.parameters(), lr=0.1, d0=1e-2)
    _train(model, optimizer, 2)
    report = lrscope.inspect(optimizer)
    group = report.groups[0]
    assert group.lr_source == "d*lr" and group.lr == pytest.approx(0.1 * 1e-2 * 1.5**2)
    assert any("next step" in note and "d*lr" in note for note in report.notes)


# The real packages, while lrscope does not model them (the table in lrscope.torch.published).


def test_schedulefree_reports_its_warmed_up_lr():
    schedulefree = pytest.importorskip("schedulefree")
    model = _model()
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2, warmup_steps=4)
    optimizer.train()
    collect = CollectSink()
    with _quiet_watch(optimizer, sinks=[collect]):
        _train(model, optimizer, 6)
    if collect.reports[0].family is not None:
        pytest.skip("lrscope models schedule-free now: its own tests cover it")
    lrs = [r.groups[0].lr for r in collect.reports]
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert {r.groups[0].lr_source for r in collect.reports} == {"scheduled_lr"}
    assert all(math.isnan(r.groups[0].step_size) for r in collect.reports)


@pytest.mark.parametrize("module, name", [("prodigyopt", "Prodigy"), ("dadaptation", "DAdaptAdam")])
def test_prodigy_and_dadaptation_report_d_times_lr(module, name):
    cls = getattr(pytest.importorskip(module), name)
    model = _model()
    optimizer = cls(model.parameters(), lr=1.0)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["d"]))
    collect = CollectSink()
    with _quiet_watch(optimizer, sinks=[collect]):
        _train(model, optimizer, 5)
    if collect.reports[0].family is not None:
        pytest.skip(f"lrscope models {name} now: its own tests cover it")
    assert len(set(seen)) > 1  # d grows: the 'lr' key (1.0) is not the lr applied
    for report, d in zip(collect.reports, seen):
        group = report.groups[0]
        assert group.lr_source == "d*lr" and group.lr == pytest.approx(d * 1.0)
        assert group.extra["d"] == pytest.approx(d) and math.isnan(group.step_size)


def test_keras_unmodelled_optimizer_has_no_step_size():
    keras = pytest.importorskip("keras")
    w = keras.Variable(np.ones((3, 2)), name="w")

    class CustomFtrl(keras.optimizers.Ftrl):  # Ftrl is modelled; a subclass overriding its step is not
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)

    optimizer = CustomFtrl(1e-2)
    optimizer.apply([keras.ops.ones((3, 2))], [w])
    group = lrscope.inspect(optimizer).groups[0]
    assert group.lr == pytest.approx(1e-2)
    assert math.isnan(group.step_size) and math.isnan(group.weight_decay_rate)
