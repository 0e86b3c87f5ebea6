"""Learning-rate schedules, vectorised over the 0-based count of steps already taken.

Step t (1-based) uses ``schedule(t - 1)``: that is the lr in a torch param group when
the t-th ``optimizer.step()`` runs (the scheduler has stepped t - 1 times), and the
index Keras ``LearningRateSchedule`` and Optax schedules are called with.  So any
callable following that convention (an optax schedule, a Keras schedule, a lambda)
can be used wherever a schedule is accepted.

>>> cosine(1.0, steps=5, warmup=2)(np.arange(5)).round(3).tolist()
[0.5, 1.0, 0.75, 0.25, 0.0]
>>> step(0.1, every=2, gamma=0.5)(np.arange(5)).tolist()
[0.1, 0.1, 0.05, 0.05, 0.025]
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

Schedule = Callable[[Any], Any]


def constant(lr: float) -> Schedule:
    """``lr`` at every step."""
    return lambda k: lr + 0.0 * np.asarray(k, dtype=np.float64)


def step(lr: float, every: int, gamma: float = 0.1) -> Schedule:
    """torch ``StepLR``: multiply by ``gamma`` every ``every`` steps."""
    return lambda k: lr * gamma ** (np.asarray(k) // every)


def exponential(lr: float, gamma: float) -> Schedule:
    """torch ``ExponentialLR`` / optax ``exponential_decay`` with rate ``gamma`` per step."""
    return lambda k: lr * gamma ** np.asarray(k, dtype=np.float64)


def warmup(lr: float, warmup: int) -> Schedule:
    """Linear warmup: step t uses ``lr * min(1, t / warmup)``, then constant.

    Step 1 already moves (with ``lr / warmup``), unlike warmups that start at 0.
    """
    return lambda k: lr * np.minimum(1.0, (np.asarray(k, dtype=np.float64) + 1) / max(warmup, 1))


def cosine(lr: float, steps: int, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at step ``steps``."""

    def schedule(k: Any) -> Any:
        k = np.asarray(k, dtype=np.float64)
        progress = np.clip((k - warmup + 1) / max(steps - warmup, 1), 0.0, 1.0)
        decayed = min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * progress))
        return np.where(k < warmup, lr * (k + 1) / max(warmup, 1), decayed)

    return schedule


def onecycle(lr: float, steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4) -> Schedule:
    """torch ``OneCycleLR`` (cosine annealing) with peak ``lr`` over ``steps`` steps."""
    initial = lr / div_factor
    final = initial / final_div_factor
    peak_at = float(pct_start * steps) - 1

    def anneal(start: float, end: float, fraction: Any) -> Any:
        return end + (start - end) / 2.0 * (np.cos(np.pi * fraction) + 1)

    def schedule(k: Any) -> Any:
        k = np.asarray(k, dtype=np.float64)
        rising = anneal(initial, lr, k / max(peak_at, 1e-12))
        falling = anneal(lr, final, (k - peak_at) / max(steps - 1 - peak_at, 1e-12))
        return np.where(k <= peak_at, rising, falling)

    return schedule


#: Schedules by the names the command line accepts.
BY_NAME: dict[str, Callable[..., Schedule]] = {
    "constant": constant, "step": step, "exponential": exponential, "warmup": warmup,
    "cosine": cosine, "onecycle": onecycle,
}


def evaluate(schedule: Schedule | float, counts: np.ndarray) -> np.ndarray:
    """``schedule`` at each 0-based count as float64; a plain number is a constant lr.

    Vectorised callables are called once; others (e.g. Keras schedules) per element.
    """
    if not callable(schedule):
        return np.full(counts.shape, float(schedule))
    try:
        values = np.asarray(schedule(counts), dtype=np.float64)
        if values.shape == counts.shape:
            return values
    except Exception:  # noqa: BLE001 - not vectorised; fall back to one call per step
        pass
    return np.array([float(np.asarray(schedule(int(k)))) for k in counts])
