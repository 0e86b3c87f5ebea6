"""Rules over the scalars of every step: the learning rate and its schedule.

These read ``lr`` and ``step_size`` of each group, which every report carries (a live
monitor without sinks builds reports only on measured steps: the rules then see those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from lrscope.findings.core import Rule, RuleLogic, Verdict
from lrscope.findings.observe import Step

#: Families whose step size is Adam's lr * sqrt(1 - beta2**t) / (1 - beta1**t), from which
#: the betas are recovered (None: a TensorBoard log, which does not say the family).
ADAM_FAMILIES = {"adam", "adamw", "amsgrad", "sparse_adam", None}
#: Adam needs about 2 / (1 - beta2) steps of warmup: Ma & Yarats, "On the adequacy of
#: untuned warmup for adaptive optimization" (AAAI 2021), the rule of thumb of linear warmup
#: over 2 / (1 - beta2) steps, the time v_hat needs to average enough squared gradients for
#: its variance (and so eta's) to settle; RAdam (Liu et al., 2020) rectifies the same effect.
WARMUP_FACTOR = 2.0
#: Points (t, step_size / lr) used to recover the betas: two to solve, the rest to verify.
FIT_POINTS = 4
#: Largest relative error of the recovered betas' step sizes at the points (TensorBoard
#: keeps float32: about 1e-7).
FIT_TOLERANCE = 1e-5
#: The groups' lrs stop following one schedule when the ratio of a group's lr to the first
#: group's changes by more than this (relative).  Reason: schedulers scale every group's lr
#: by the same factor (LambdaLR, cosine without eta_min, OneCycle...) and float rounding stays
#: far below 1 %; an eta_min shifts ratios, so this is an info, not a warning.
GROUP_RATIO_TOLERANCE = 0.01


class _LeadingZeros:
    """Per group: the steps of lr 0 before its lr was first positive, and whether it was."""

    def __init__(self) -> None:
        self.zeros: dict[str, list[int]] = {}  # group: [first, last] leading step with lr 0
        self.positive: set[str] = set()

    def see(self, key: str, lr: float, t: int) -> str:
        """``"leading"`` (lr 0 and never positive yet), ``"first"`` (the first positive lr),
        ``"zero"`` (lr 0 after a positive one) or ``"positive"``."""
        if key in self.positive:
            return "zero" if lr == 0 else "positive"
        if lr == 0:
            self.zeros.setdefault(key, [t, t])[1] = t
            return "leading"
        self.positive.add(key)
        return "first"


class LrZero(RuleLogic):
    rule = Rule(
        id="lr_zero", severity="warning",
        title="the learning rate reached 0",
        threshold="a group's lr == 0 on a step that was taken (not skipped), after its lr had been "
                  "positive; or on every step of the run (judged at its end). Zeros before the "
                  "first positive lr are warmup_starts_at_zero's",
        reason="a step with lr 0 moves nothing, yet Adam-type optimizers still advance t and "
               "their moments on it",
        explanation=(
            "The learning rate the steps used was exactly 0, so they did not move the "
            "parameters (they still advanced t and the moments of Adam-type optimizers). "
            "Usual causes: a schedule whose length is shorter than the run (it decayed to 0 "
            "and stays there: set its length to the real number of optimizer steps, counting "
            "gradient accumulation, or give it a floor such as eta_min), a step-decay "
            "schedule that underflowed, or a group frozen with lr=0 (then leave its "
            "parameters out of the optimizer instead)."),
        needs="lr on every step")

    def __init__(self) -> None:
        self.leading = _LeadingZeros()

    def observe(self, step: Step) -> Iterable[Verdict]:
        for g in step.groups:
            if not math.isnan(g.lr):
                key = f"{step.prefix}/{g.name}"
                seen = self.leading.see(key, g.lr, step.t)
                if seen != "leading":
                    yield Verdict(key, "lr was 0" if seen == "zero" else None)

    def finish(self) -> Iterable[Verdict]:
        for key, (first, last) in self.leading.zeros.items():
            if key not in self.leading.positive:
                yield Verdict(key, "lr was 0 on every step", since=first, until=last)


class WarmupStartsAtZero(RuleLogic):
    rule = Rule(
        id="warmup_starts_at_zero", severity="info",
        title="the first steps used lr 0",
        threshold="a group's lr == 0 on the steps before its lr is first positive",
        reason="those steps move nothing but still advance Adam's t and moments; common (Hugging "
               "Face's linear and cosine schedules with warmup start at 0) and costing a step, "
               "hence an info",
        explanation=(
            "The warmup starts at lr 0: its first step(s) did not move the parameters, yet "
            "Adam-type optimizers advanced t and their moments on them (so the bias correction "
            "is one step further along than the parameters). Harmless in long runs; to use "
            "every step, start the warmup at a small fraction of the peak lr instead (e.g. "
            "LinearLR(start_factor=0.01), or a warmup lambda of (step + 1) / warmup_steps)."),
        needs="lr on every step from the first")

    def __init__(self) -> None:
        self.leading = _LeadingZeros()

    def observe(self, step: Step) -> Iterable[Verdict]:
        for g in step.groups:
            if not math.isnan(g.lr):
                key = f"{step.prefix}/{g.name}"
                if self.leading.see(key, g.lr, step.t) == "first" and key in self.leading.zeros:
                    first, last = self.leading.zeros[key]
                    steps = f"step {first}" if first == last else f"steps {first}-{last}"
                    yield Verdict(key, f"lr was 0 on {steps}, then {g.lr:.3g}", since=first, until=last)


def fit_adam_betas(points: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """(beta1, beta2) such that step_size / lr = sqrt(1 - beta2**t) / (1 - beta1**t) at the
    ``points`` (t, ratio), or None when no pair fits all within ``FIT_TOLERANCE``.

    Two points determine the pair: beta2 follows from beta1 at the first, and beta1 is the
    root of the second's residual, bracketed on a grid and refined by bisection.  The
    others verify it.

    >>> ratio = lambda t: ((1 - 0.95 ** t) ** 0.5) / (1 - 0.9 ** t)
    >>> b1, b2 = fit_adam_betas([(t, ratio(t)) for t in (1, 2, 3, 4)])
    >>> round(b1, 6), round(b2, 6)
    (0.9, 0.95)
    >>> fit_adam_betas([(1, 1.0), (2, 1.0), (3, 1.0)]) is None  # plain SGD: step_size == lr
    True
    """
    if len(points) < 3:
        return None
    (ta, ra), (tb, rb) = points[0], points[1]

    def beta2(x: np.ndarray) -> np.ndarray:
        inner = 1 - (ra * (1 - x ** ta)) ** 2
        with np.errstate(all="ignore"):
            return np.where((inner > 0) & (inner < 1), inner ** (1 / ta), np.nan)

    def residual(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.sqrt(1 - beta2(x) ** tb) / (1 - x ** tb) - rb

    grid = np.concatenate([[0.0], 1 - np.logspace(0, -7, 4000)[1:]])
    values = residual(grid)
    candidates = [0.0]
    for i in np.flatnonzero(np.isfinite(values[:-1]) & np.isfinite(values[1:])
                            & (values[:-1] * values[1:] <= 0)):
        low, high = grid[i], grid[i + 1]
        for _ in range(60):
            middle = (low + high) / 2
            if residual(np.array(middle)) * residual(np.array(low)) <= 0:
                high = middle
            else:
                low = middle
        candidates.append(float(low))
    best = None
    for b1 in candidates:
        b2 = float(beta2(np.array(b1)))
        if not 0 < b2 < 1:
            continue
        error = max(abs(math.sqrt(1 - b2 ** t) / (1 - b1 ** t) / r - 1) for t, r in points)
        if error <= FIT_TOLERANCE and (best is None or error < best[0]):
            best = (error, b1, b2)
    return None if best is None else (best[1], best[2])


@dataclass
class _Schedule:
    """What the warmup rule keeps of one group's lr."""

    first_t: int
    first_lr: float
    peak_t: int
    peak_lr: float
    last_t: int
    points: list[tuple[int, float]] = field(default_factory=list)
    family: str | None = None
    judged: bool = False


class WarmupShort(RuleLogic):
    rule = Rule(
        id="warmup_shorter_than_bias_correction", severity="info",
        title="lr warmup shorter than Adam needs",
        threshold=f"the lr rises from the first step to its peak in W steps and W < "
                  f"{WARMUP_FACTOR:g} / (1 - beta2) (beta2 recovered from step_size / lr); judged "
                  "when the lr first falls below its peak, or at the end of the run",
        reason="Ma & Yarats (2021): Adam's v_hat needs about 2 / (1 - beta2) steps before its "
               "variance, and so the effective lr's, settles; warming up over that many steps is "
               "their rule of thumb (2000 steps for beta2 = 0.999, 40 for 0.95). An info, not a "
               "warning: shorter warmups often train well",
        explanation=(
            "Adam's bias correction removes the bias of its moment estimates, not their noise: "
            "for the first ~1 / (1 - beta2) steps, v_hat averages few squared gradients and "
            "the effective lr lr / (sqrt(v_hat) + eps) of individual elements can be very "
            "large. A warmup is what keeps those early steps small; one much shorter than "
            "2 / (1 - beta2) steps (Ma & Yarats' rule of thumb) leaves some of them "
            "unprotected, which shows as early loss spikes or instability at large lr. If the "
            "run is unstable early, lengthen the warmup to about 2 / (1 - beta2) steps, or "
            "lower beta2 (0.95, as for large language models: 40 steps), or use RAdam; "
            "if it trains well, this is only a note."),
        needs="lr and step_size on every step from the first (Adam-family step sizes)")

    def __init__(self) -> None:
        self.groups: dict[str, _Schedule] = {}

    def observe(self, step: Step) -> Iterable[Verdict]:
        for g in step.groups:
            if math.isnan(g.lr):
                continue
            key = f"{step.prefix}/{g.name}"
            s = self.groups.get(key)
            if s is None:
                s = self.groups[key] = _Schedule(step.t, g.lr, step.t, g.lr, step.t, family=step.family)
            s.last_t = step.t
            if g.lr > 0 and math.isfinite(g.step_size) and len(s.points) < FIT_POINTS:
                s.points.append((step.t, g.step_size / g.lr))
            if g.lr > s.peak_lr:
                s.peak_t, s.peak_lr = step.t, g.lr
            elif g.lr < s.peak_lr and not s.judged:
                verdict = self._judge(key, s)
                if verdict is not None:
                    yield verdict

    def finish(self) -> Iterable[Verdict]:
        for key, s in self.groups.items():
            if not s.judged and s.peak_t < s.last_t:  # constant after the warmup
                verdict = self._judge(key, s)
                if verdict is not None:
                    yield verdict

    @staticmethod
    def _judge(key: str, s: _Schedule) -> Verdict | None:
        s.judged = True
        warmup = s.peak_t - s.first_t
        if warmup <= 0 or s.family not in ADAM_FAMILIES:
            return None
        betas = fit_adam_betas(s.points)
        if betas is None:
            return None
        needed = WARMUP_FACTOR / (1 - betas[1])
        if warmup >= needed:
            return None
        return Verdict(key, f"the lr warms up over {warmup} steps (peak at step {s.peak_t}), "
                            f"{needed - warmup:.0f} steps ({needed / warmup:.1f} x) shorter than "
                            f"2 / (1 - beta2) = {needed:.0f} steps for beta2 = {betas[1]:.4g}",
                       since=s.first_t, until=s.peak_t)


class LrOffSchedule(RuleLogic):
    rule = Rule(
        id="lr_off_schedule", severity="info",
        title="a group's lr does not follow the others' schedule",
        threshold=f"in an optimizer with several groups, lr(group) / lr(first group) changes by "
                  f"more than {GROUP_RATIO_TOLERANCE:.0%} from its value at the first step",
        reason="schedulers scale every group's lr by the same factor, so the ratios stay put "
               "(to rounding); an eta_min or a per-group schedule moves them deliberately, "
               "hence an info",
        explanation=(
            "The groups' learning rates do not keep their proportions: one group is not "
            "following the schedule the others follow. Usual causes: a group added with "
            "add_param_group after the scheduler was created (the scheduler does not know its "
            "base lr), code that writes group['lr'] by hand, two schedulers on one optimizer, "
            "or a scheduler given one lambda per group by mistake. If it is deliberate "
            "(discriminative fine-tuning with per-group schedules, an eta_min floor), ignore "
            "this; otherwise recreate the scheduler after all groups exist."),
        needs="lr of every group on every step")

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, int]] = {}

    def observe(self, step: Step) -> Iterable[Verdict]:
        if len(step.groups) < 2:
            return
        reference = step.groups[0]
        if not reference.lr > 0:
            return
        for g in step.groups[1:]:
            if not g.lr > 0:
                continue
            key = f"{step.prefix}/{g.name}"
            ratio = g.lr / reference.lr
            first, when = self.first.setdefault(key, (ratio, step.t))
            moved = abs(ratio / first - 1) > GROUP_RATIO_TOLERANCE
            yield Verdict(key, f"lr is {ratio:.4g} x {reference.name}'s, {first:.4g} x at step {when}"
                          if moved else None)


#: Described here, judged by the torch monitor (``lrscope.torch.monitor``): the logs do
#: not carry a scheduler's state.
SCHEDULER_BEFORE_OPTIMIZER = Rule(
    id="scheduler_stepped_before_optimizer", severity="warning",
    title="the scheduler stepped before the optimizer",
    threshold="torch, live: a group that has a scheduler's initial_lr when watch() attaches to a "
              "fresh optimizer uses, on the first optimizer step, an lr other than the one it had "
              "then",
    reason="the scheduler set the first lr of its schedule when it was created; anything that "
           "changes lr before the first optimizer.step() makes the first step use another one",
    explanation=(
        "The first optimizer step did not use the first lr of the schedule: "
        "scheduler.step() (or code that writes group['lr']) ran between creating the scheduler "
        "and the first optimizer.step(), so the whole schedule is shifted by one step and its "
        "first value (often the start of the warmup) is skipped. Call scheduler.step() after "
        "optimizer.step() in the loop (PyTorch >= 1.1 order). This rule needs the monitor "
        "attached after the scheduler was created and before the first step; lrscope check "
        "reports it only when a live monitor recorded it in the JSONL log."),
    needs="torch's param_groups when watch() attaches and at the first step (live only)",
    live_only=True)


RULES = [LrZero, WarmupStartsAtZero, WarmupShort, LrOffSchedule]
