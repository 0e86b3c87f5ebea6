"""Offline, data-independent step-size curves: alpha_1 ... alpha_steps.

>>> curve = step_size_curve("adam", 10_000, lr=1e-3)
>>> round(float(curve[0] / 1e-3), 4)          # alpha_1 / lr = sqrt(1 - 0.999) / (1 - 0.9)
0.3162
>>> int(np.argmin(curve)) + 1                 # the dip: default Adam is slowest near t = 10
12
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrscope import formulas, schedules


def step_size_curve(
    name: str,
    steps: int,
    lr: float | schedules.Schedule | None = None,
    *,
    convention: str | None = None,
    term: str = "step_size",
    **hyper: Any,
) -> np.ndarray:
    """Array of the step size of steps 1..``steps`` (float64).

    ``lr`` is a number or a schedule called with the 0-based count of steps already
    taken (see ``lrscope.schedules``); it defaults to the framework's default lr.

    >>> step_size_curve("sgd", 3, lr=lambda k: 0.1 * (k + 1)).round(2).tolist()
    [0.1, 0.2, 0.3]
    """
    steps = formulas.step_count(steps, "steps")
    convention = convention or formulas.default_convention(name)
    if lr is not None:
        # A schedule's values replace this placeholder below.
        hyper["lr"] = 1.0 if callable(lr) else lr
    h = formulas.checked(formulas.hyperparameters(name, convention, **hyper))
    t = np.arange(1, steps + 1)
    if callable(lr):
        h["lr"] = schedules.evaluate(lr, t - 1)
    values = formulas.family(name).step_sizes(np, t, h, convention)
    if term not in values:
        raise ValueError(f"{name!r} has no term {term!r}; choose one of {sorted(values)}")
    return np.broadcast_to(np.asarray(values[term], dtype=np.float64), t.shape).copy()
