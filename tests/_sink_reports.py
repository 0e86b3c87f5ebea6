"""StepReports built from numbers the tests generate, with the raw data kept for checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lrscope.report import Distribution, GroupReport, ParamReport, StepReport

BETA1, BETA2, WEIGHT_DECAY = 0.9, 0.999, 0.01
SIZES = {"layer0.weight": 400, "layer1.bias": 250}


def lr_at(t: int, group: int) -> float:
    return 1e-3 * (group + 1) * (1.0 - t / 1000)


def step_size_at(t: int, group: int) -> float:
    return lr_at(t, group) * math.sqrt(1 - BETA2**t) / (1 - BETA1**t)


@dataclass
class Raw:
    """The data behind one group of a report."""

    eta: dict[str, np.ndarray]
    eps_counts: dict[str, int]
    update: dict[str, np.ndarray]
    param: dict[str, np.ndarray]

    @property
    def all_eta(self) -> np.ndarray:
        return np.concatenate(list(self.eta.values()))

    @property
    def update_to_param(self) -> float:
        update = np.concatenate(list(self.update.values()))
        param = np.concatenate(list(self.param.values()))
        return float(np.linalg.norm(update) / np.linalg.norm(param))


def make_report(t: int, groups: tuple[str, ...] = ("pg0", "pg1"), optimizer: str = "Adam",
                distributions: bool = True) -> tuple[StepReport, dict[str, Raw]]:
    """A report of step ``t``: log-normal eta, random eps counts, updates and params."""
    rng = np.random.default_rng(t)
    raws: dict[str, Raw] = {}
    reports = []
    for index, name in enumerate(groups):
        raw = Raw({}, {}, {}, {})
        params = {}
        for tensor, size in SIZES.items():
            raw.eta[tensor] = 10 ** rng.normal(-3 - index, 0.5, size)
            raw.eps_counts[tensor] = int(rng.integers(0, 20))
            raw.update[tensor] = rng.normal(0, 1e-3, size)
            raw.param[tensor] = rng.normal(0, 1, size)
            report = ParamReport(name=tensor, shape=(size,))
            if distributions:
                report.effective_lr = Distribution.from_array(raw.eta[tensor], raw.eps_counts[tensor])
                report.update_norm = float(np.linalg.norm(raw.update[tensor]))
                report.param_norm = float(np.linalg.norm(raw.param[tensor]))
            params[tensor] = report
        reports.append(GroupReport.combine(
            params, name=name, lr=lr_at(t, index), step_size=step_size_at(t, index),
            weight_decay_rate=lr_at(t, index) * WEIGHT_DECAY))
        raws[name] = raw
    return StepReport(t=t, optimizer=optimizer, framework="torch", family="adam",
                      groups=reports), raws


class Collect:
    """An in-memory sink recording the steps it saw and the threads it ran on."""

    def __init__(self, background: bool = False, fail_at: int | None = None):
        self.background = background
        self.fail_at = fail_at
        self.steps: list[int] = []
        self.threads: set[str] = set()
        self.closed = False

    def write(self, report: StepReport) -> None:
        import threading

        if report.t == self.fail_at:
            raise RuntimeError("sink broke on purpose")
        self.steps.append(report.t)
        self.threads.add(threading.current_thread().name)

    def close(self) -> None:
        self.closed = True


def write_reports(sinks: list, steps: int, every: int) -> dict:
    """Reports 1..steps (distributions every ``every`` steps, from step 1) through a
    SinkGroup, closed at the end; returns each step's raw data."""
    from lrscope.sinks import SinkGroup

    group = SinkGroup(sinks)
    raws = {}
    for t in range(1, steps + 1):
        report, raws[t] = make_report(t, distributions=(t - 1) % every == 0)
        group.write(report)
    group.close()
    return raws
