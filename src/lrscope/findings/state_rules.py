"""Rules over the optimizer's state as the distributions show it: eps, gradients, NaN.

Each reads the distributions of the steps that carry them (every ``every`` steps), per
tensor and per group.  The thresholds are the named constants below, each with its reason.
The helpers here (the update ratio, the decay's share of it, v = 0) serve ``update_rules``
too.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

from lrscope.findings.core import Rule, RuleLogic, Subject, Verdict, percent, subjects
from lrscope.findings.observe import Stats, Step

#: eps dominates the denominator of at least this share of a tensor's elements.  Reason:
#: past half, the tensor as a whole takes SGD-like steps of lr/eps rather than Adam's
#: normalised ones; a healthy run has a few percent at most (the demo: 4.7 % of its first
#: layer, the weights of three pixels blank in every image).
EPS_DOMINATED_MAX = 0.5
#: The eps-dominated share grew by at least this much (absolute) since the subject's lowest
#: share.  Reason: a quarter of the elements moving into the eps regime during training
#: means the gradient scale is falling towards eps (a shrinking loss or loss scale).
EPS_DOMINATED_GROWTH = 0.25
#: Steps without any gradient before ``no_gradient`` holds.  Reason: a layer behind a
#: zero-initialised one gets zero gradients for its first step or few, legitimately; twenty
#: steps without a single nonzero gradient is no longer start-up.
NO_GRADIENT_STEPS = 20
#: Relative tolerance of "the update is the weight decay and nothing else": the update
#: ratio of a tensor without gradient is rate / (1 - rate) to about 1e-8 (float32 state).
DECAY_ONLY_TOLERANCE = 1e-5


def v_is_zero(stats: Stats) -> bool:
    """Every element is eps-dominated and the effective lr takes one value: the second
    moment is the same everywhere and below eps, which in practice means v = 0 (eta = lr/eps
    exactly).  Needs an eps-dominated share and at least two elements (where counted)."""
    return (stats.eps_dominated is not None and stats.eps_dominated >= 1.0
            and (stats.count is None or stats.count >= 2)
            and stats.eta_min is not None and stats.eta_max is not None
            and math.isfinite(stats.eta_max) and stats.eta_max > 0
            and stats.eta_max - stats.eta_min <= 1e-6 * stats.eta_max)


def ratio(stats: Stats) -> float | None:
    """||delta theta|| / ||theta||, from the report or from the norms."""
    if stats.update_to_param is not None:
        return stats.update_to_param
    if stats.update_norm is not None and stats.param_norm:
        return stats.update_norm / stats.param_norm
    return None


def decay_excess(stats: Stats, decay_rate: float) -> float | None:
    """u / d - 1: the update ratio u against d = rate / (1 - rate), the ratio decoupled
    decay alone gives (it removes rate * theta_before; the norm is that of theta after the
    step).  0 when the update is the decay and nothing else; None when unknown or no decay."""
    u = ratio(stats)
    if u is None or not math.isfinite(u) or not 0 < decay_rate < 1:
        return None
    return u / (decay_rate / (1 - decay_rate)) - 1


def decay_only(stats: Stats, decay_rate: float) -> bool | None:
    """Whether the update has no gradient part (m = 0): it is exactly the decoupled decay,
    or exactly 0 without decay.  None when the update ratio is unknown.  An unknown (NaN)
    decay rate: only an update of exactly 0 is known to be decay-only."""
    u = ratio(stats)
    if u is None or not math.isfinite(u):
        return None
    excess = decay_excess(stats, decay_rate)
    if excess is not None:
        return abs(excess) <= DECAY_ONLY_TOLERANCE
    return u == 0


class Streaks:
    """The step since which a per-subject condition has held at every judgement."""

    def __init__(self) -> None:
        self.since: dict[str, int] = {}

    def update(self, subject: str, holds: bool, t: int) -> int | None:
        if not holds:
            self.since.pop(subject, None)
            return None
        return self.since.setdefault(subject, t)


def moving(step: Step) -> Iterator[Subject]:
    """The subjects of a measured step whose group used a positive lr (an lr of 0 moves
    nothing and is the ``lr_zero`` rule's)."""
    for s in subjects(step):
        if s.group.lr > 0 or math.isnan(s.group.lr):
            yield s


EXPLAIN_EPS = (
    "Adam-type optimizers divide by sqrt(v_hat) + eps. Where the gradient's scale is below eps, "
    "eps dominates the denominator and the optimizer behaves like SGD with a learning rate of "
    "about lr/eps there (1e8 x lr for eps = 1e-8), not like Adam: the per-parameter "
    "normalisation is lost. Usual causes: an eps too large for the gradient scale (eps=1e-3 "
    "copied from another recipe, or Keras' default 1e-7 with tiny gradients), a loss scaled "
    "down (averaged over many tokens, multiplied by a small factor, unscaled gradients under "
    "mixed precision), or gradients that vanish in early layers. Try a smaller eps (1e-8, or "
    "1e-10 to 1e-15 for very small gradients), or check the loss and gradient scale; if the "
    "share keeps growing, the gradients are shrinking during training.")


class EpsDominated(RuleLogic):
    rule = Rule(
        id="eps_dominated", severity="warning",
        title="eps dominates the denominator of most elements",
        threshold=f"eps_dominated >= {EPS_DOMINATED_MAX:.0%} of a tensor's or group's elements "
                  "(tensors whose v is exactly 0 are left to no_gradient / second_moment_underflow)",
        reason="past half, the tensor as a whole takes SGD-like steps of lr/eps rather than "
               "normalised ones; a healthy run has a few percent at most (the demo: 4.7% of its "
               "first layer, the weights of pixels blank in every image)",
        explanation=EXPLAIN_EPS,
        needs="the eps_dominated share (families with an eps in the denominator)")

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            share = self._share(s)
            if share is not None:
                holds = share >= EPS_DOMINATED_MAX
                yield Verdict(s.name, f"{percent(share)} of the elements are eps-dominated "
                                      f"(eta ~ lr/eps there)" if holds else None)

    @staticmethod
    def _share(s: Subject) -> float | None:
        if s.stats.eps_dominated is None or v_is_zero(s.stats):
            return None
        if s.tensor is not None or not s.group.params:
            return s.stats.eps_dominated
        # A group: without the tensors whose v is 0 (their own rules say why).
        kept = [p for p in s.group.params.values() if p.eps_dominated is not None and not v_is_zero(p)]
        if not kept or any(p.count is None for p in kept):
            return None if not kept else s.stats.eps_dominated
        total = sum(p.count for p in kept)  # type: ignore[misc]
        dominated = sum(p.eps_dominated * p.count for p in kept)  # type: ignore[operator]
        return dominated / total if total else None


class EpsDominatedGrowing(RuleLogic):
    rule = Rule(
        id="eps_dominated_growing", severity="warning",
        title="the eps-dominated share is growing",
        threshold=f"eps_dominated rose by >= {EPS_DOMINATED_GROWTH:.0%} of the elements "
                  "(absolute) above the lowest share measured earlier for that tensor or group",
        reason="a quarter of the elements moving into the eps regime during training means the "
               "gradient scale is falling towards eps",
        explanation=EXPLAIN_EPS,
        needs="the eps_dominated share over the measured steps")

    def __init__(self) -> None:
        self.lowest: dict[str, tuple[float, int]] = {}  # subject: (lowest share, its step)

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            eps = s.stats.eps_dominated
            if eps is None or v_is_zero(s.stats):
                continue
            if s.name not in self.lowest or eps < self.lowest[s.name][0]:
                self.lowest[s.name] = (eps, step.t)
            lowest, when = self.lowest[s.name]
            holds = eps - lowest >= EPS_DOMINATED_GROWTH
            yield Verdict(s.name, f"eps-dominated share grew from {percent(lowest)} (step {when}) "
                                  f"to {percent(eps)}" if holds else None)


class NoGradient(RuleLogic):
    rule = Rule(
        id="no_gradient", severity="warning",
        title="a tensor that never moves: no gradient",
        threshold=f"the update is exactly the weight decay (no gradient part: m = 0) at every "
                  f"measured step over >= {NO_GRADIENT_STEPS} steps; or, with v = 0 everywhere "
                  f"(all elements eps-dominated, one effective lr), at a step >= {NO_GRADIENT_STEPS}",
        reason="a layer behind a zero-initialised one gets zero gradients for a step or a few, "
               f"legitimately; {NO_GRADIENT_STEPS} steps without a single nonzero gradient is "
               "no longer start-up (v = 0 at step t means every gradient so far was 0)",
        explanation=(
            "The optimizer holds this tensor but its gradient is zero: the tensor does not "
            "train (with decoupled weight decay it only shrinks). Usual causes: the tensor is "
            "not used in the forward pass (a dead branch, a module replaced after the optimizer "
            "was built, tied weights where the copy is not the one used), the graph is cut "
            "(.detach(), .data, torch.no_grad(), an integer cast), gradients are zeroed after "
            "backward, or a dead activation (all-negative inputs to a ReLU). Check that "
            "loss.backward() reaches it (param.grad nonzero) or remove it from the optimizer. "
            "With torch, zero_grad(set_to_none=True) leaves such tensors without .grad, and "
            "then the optimizer skips them: they do not appear in the reports at all."),
        needs="update_norm and param_norm (modelled families, or empirical mode); the shares "
              "of eps-dominated elements to see v = 0")

    def __init__(self) -> None:
        self.streaks = Streaks()

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            frozen = decay_only(s.stats, s.group.weight_decay_rate)
            if frozen is None:
                continue
            since = self.streaks.update(s.name, frozen, step.t)
            if since is None:
                yield Verdict(s.name, None)
                continue
            v_zero = v_is_zero(s.stats)
            start = 1 if v_zero else since
            if step.t - start + (1 if v_zero else 0) < NO_GRADIENT_STEPS:
                continue  # not judged yet: neither holds nor breaks the streak
            decay = " apart from weight decay" if s.group.weight_decay_rate > 0 else ""
            what = ("v = 0 everywhere: no gradient since the first step" if v_zero
                    else f"zero gradient part at every measured step since step {since}")
            yield Verdict(s.name, f"the update is zero{decay} ({what})", since=start)


class SecondMomentUnderflow(RuleLogic):
    rule = Rule(
        id="second_moment_underflow", severity="warning",
        title="v = 0 while m != 0: the squared gradient underflows",
        threshold="every element eps-dominated with a single effective lr (v = 0 everywhere), "
                  "at least two elements, while the tensor moves by more than its weight decay "
                  "(m != 0)",
        reason="a nonzero first moment with an exactly zero second moment is only possible "
               "when g**2 rounds to 0 while g does not: any v > 0 would make the effective lrs "
               "differ between elements",
        explanation=(
            "The second moment v is 0 while the first moment m is not: the squared gradient "
            "underflowed (g**2 < 6e-8 in float16, or below the smallest bfloat16/float16 "
            "subnormal), typically with optimizer states in half precision or tiny gradients "
            "(|g| < 2.4e-4 in float16). Adam then divides m by eps alone and takes steps of "
            "lr * m / eps: huge, unnormalised updates. Keep the optimizer states in float32 "
            "(mixed precision with float32 master weights, or an optimizer that upcasts), "
            "scale the loss up, or raise eps to the gradient scale."),
        needs="the eps_dominated share, the effective lr's min and max, and the update norm")

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            if s.tensor is None or s.stats.eps_dominated is None or math.isnan(s.group.weight_decay_rate):
                continue  # (an unknown decay rate could be all the movement)
            frozen = decay_only(s.stats, s.group.weight_decay_rate)
            if frozen is None:
                continue
            holds = v_is_zero(s.stats) and not frozen
            yield Verdict(s.name, f"v = 0 in every element (eta = {s.stats.eta_max:.3g} = lr/eps) "
                                  f"while the tensor moves: update/param {ratio(s.stats):.3g}"
                          if holds else None)


class Nonfinite(RuleLogic):
    rule = Rule(
        id="nonfinite", severity="warning",
        title="NaN or Inf in the optimizer state or the update",
        threshold="any NaN/Inf element in the effective lr (or |update|), or a NaN/Inf update "
                  "or parameter norm",
        reason="one NaN spreads to every later step of that tensor (Adam's moments keep it), and "
               "from there to the loss",
        explanation=(
            "The optimizer state or the update holds NaN or Inf: a gradient was NaN/Inf "
            "(overflow in float16, log(0), division by zero, an exploding loss) and the "
            "moments kept it, or the parameters themselves diverged. Find the first step "
            "where it appears (the steps listed here, at the resolution of every=); check the "
            "loss and gradients there (torch.autograd.set_detect_anomaly, or a check of "
            "torch.isfinite on the gradients before optimizer.step()). Under float16, use a "
            "GradScaler (it skips such steps) or bfloat16; clip gradients; lower the lr."),
        needs="the distribution's nonfinite count and the norms")

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in subjects(step):
            bad = []
            if s.stats.nonfinite:
                count = f" of {s.stats.count}" if s.stats.count else ""
                bad.append(f"{int(s.stats.nonfinite)}{count} elements NaN/Inf")
            for label in ("update_norm", "param_norm"):
                value = getattr(s.stats, label)
                if value is not None and not math.isfinite(value):
                    bad.append(f"{label} {value}")
            yield Verdict(s.name, ", ".join(bad) if bad else None)


RULES = [EpsDominated, EpsDominatedGrowing, NoGradient, SecondMomentUnderflow, Nonfinite]
for _rule in RULES:
    _rule.measured_only = True  # every rule here reads the distributions
