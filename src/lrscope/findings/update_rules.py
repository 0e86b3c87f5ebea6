"""Rules over the update: its ratio to the parameters, divergence, and weight decay.

Each reads the norms of the steps that carry distributions (every ``every`` steps), per
tensor and per group.  The thresholds are the named constants below, each with its reason.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Iterable

from lrscope.findings.core import Rule, RuleLogic, Subject, Verdict, subjects
from lrscope.findings.observe import Stats, Step
from lrscope.findings.state_rules import DECAY_ONLY_TOLERANCE, Streaks, decay_excess, moving, ratio

#: ||delta theta|| / ||theta|| above which a tensor is rewritten: a tenth of its norm per step
#: replaces it in about ten steps.  Reason: the folklore healthy value is about 1e-3 (the
#: demo's largest matrix ratio, in warmup at lr 2e-3, is 0.0075); 0.1 is a hundred times that.
UPDATE_RATIO_MAX = 0.1
#: A tensor is an outlier when its update ratio divided by its group's lr lies this factor
#: above the median of the optimizer's tensors (at the same step).  Reason: dividing by lr
#: allows groups with different lrs; tensors of one model differ by 10-60 x (LayerNorm gains,
#: whose norm is large, move slower than weight matrices), not by 100 x.
OUTLIER_HIGH = 100.0
#: ... or this factor below it ("frozen in effect").  Reason: as above, with room for the
#: 20-60 x that separate large-norm tensors (LayerNorm gains) from weight matrices.
OUTLIER_LOW = 1000.0
#: Tensors with fewer positive ratios at a step are not compared with each other.
OUTLIER_MIN_TENSORS = 4
#: A tensor whose first nonzero update ratio is 1 within this tolerance started from zero
#: (a zero-initialised bias or LoRA matrix: theta after its first move is that move, ratio
#: 1, then about 1/t); a tensor with a norm of its own reaches exactly 1 only by chance; ...
ZERO_START_TOLERANCE = 1e-3
#: ... its ratios say little until this many steps have given it a norm of its own.
ZERO_START_STEPS = 100
#: ||theta|| grew by this factor since the subject was first measured: divergence.  Reason:
#: trained weights stay within a few times their initial norm (the demo's largest growth is
#: 1.8 x); ten times is runaway growth (too high an lr, no normalisation, a loss that rewards
#: large weights).
DIVERGENCE_GROWTH = 10.0
#: The update ratio lies within this fraction of the ratio decay alone gives: whatever the
#: gradient adds is at most a fifth of what decay removes (if the two are orthogonal; a
#: fiftieth if aligned).  Reason: the norms alone cannot separate the two parts, only bound
#: them; in a healthy run (the demo's output layer) the gradient balances the decay and the
#: ratio passes through this band at isolated steps only.
DECAY_DOMINATED_BAND = 0.02
#: ... at every measured step over this many steps, while the norm shrinks.  Reason: an
#: isolated step in the band is a coincidence of directions; twenty steps are not.
DECAY_EXCEEDS_STEPS = 20
#: Tensors of at most this many dimensions are biases, norm gains and scales (by shape).
VECTOR_NDIM = 1
#: Names that mark biases and norm parameters where the logs carry no shapes (TensorBoard).
NORM_OR_BIAS_NAMES = ("bias", "norm", "ln_", "ln.", "bn", "gamma", "beta", "scale")


class _History:
    """First measurements per subject: the first t, the first nonzero ratio, the first norm."""

    def __init__(self) -> None:
        self.first_t: dict[str, int] = {}
        self.first_ratio: dict[str, float] = {}
        self.first_norm: dict[str, float] = {}

    def see(self, s: Subject, t: int) -> None:
        self.first_t.setdefault(s.name, t)
        r = ratio(s.stats)
        if r is not None and r > 0 and s.name not in self.first_ratio:
            self.first_ratio[s.name] = r  # the first step that moved it
        if s.stats.param_norm is not None and math.isfinite(s.stats.param_norm) and s.stats.param_norm > 0:
            self.first_norm.setdefault(s.name, s.stats.param_norm)

    def young_from_zero(self, name: str, t: int) -> bool:
        """Started from zero and still in its first ``ZERO_START_STEPS`` steps."""
        return self.started_at_zero(name) and t < self.first_t.get(name, t) + ZERO_START_STEPS

    def started_at_zero(self, name: str) -> bool:
        """Whether the first step that moved it moved it by its whole norm (ratio 1)."""
        first = self.first_ratio.get(name)
        return first is not None and (abs(first - 1) <= ZERO_START_TOLERANCE or math.isinf(first))


def _matrix_like(s: Subject) -> bool:
    """A tensor that is not a bias or norm parameter, or a group holding one: the update
    ratio of a vector says little (a bias crossing zero has a tiny norm, hence any ratio)."""
    if s.tensor is not None:
        return not _is_vector(s.tensor, s.stats)[0]
    return not s.group.params or any(not _is_vector(n, p)[0] for n, p in s.group.params.items())


def _is_vector(name: str, stats: Stats) -> tuple[bool, str]:
    """Whether a tensor is a bias or a norm parameter, and how that was decided."""
    if stats.shape is not None:
        return len(stats.shape) <= VECTOR_NDIM, "shape"
    return _named_like_vector(name), "name"


@functools.lru_cache(maxsize=4096)
def _named_like_vector(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in NORM_OR_BIAS_NAMES)


EXPLAIN_RATIO = (
    "||delta theta|| / ||theta|| is the fraction of a tensor's norm that one step changes; "
    "about 1e-3 is the usual healthy value. Far above it, the tensor is rewritten every few "
    "steps and keeps nothing it learned (too high an lr for it, a missing warmup, an "
    "eps-dominated or underflowing denominator, a tensor that started at a tiny norm); far "
    "below the run's other tensors, it is frozen in effect (vanishing gradients, an lr "
    "multiplier gone wrong, a huge norm). Lower or raise that group's lr (or give the tensor "
    "its own group), add or lengthen the warmup, check its initialisation and its gradients.")


class UpdateRatioHigh(RuleLogic):
    rule = Rule(
        id="update_ratio_high", severity="warning",
        title="update_to_param above the band: the tensor is rewritten every few steps",
        threshold=f"update_to_param > {UPDATE_RATIO_MAX:g}, for tensors other than biases and norm "
                  f"parameters (and groups holding one); tensors that started from zero are "
                  f"judged from {ZERO_START_STEPS} steps after their first measurement",
        reason="a tenth of the norm per step replaces the tensor in about ten steps; the folklore "
               "healthy value is about 1e-3 and the demo's largest matrix ratio, in warmup, 0.0075",
        explanation=EXPLAIN_RATIO,
        needs="update_to_param (modelled families, or empirical mode)")

    def __init__(self) -> None:
        self.history = _History()

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            r = ratio(s.stats)
            if r is None or not math.isfinite(r) or not _matrix_like(s):
                continue
            self.history.see(s, step.t)
            if self.history.young_from_zero(s.name, step.t):
                continue
            yield Verdict(s.name, f"update_to_param {r:.3g} (band: <= {UPDATE_RATIO_MAX:g})"
                          if r > UPDATE_RATIO_MAX else None)


class UpdateRatioOutlier(RuleLogic):
    rule = Rule(
        id="update_ratio_outlier", severity="warning",
        title="update_to_param far from the run's other tensors",
        threshold=f"a tensor's update_to_param / lr is > {OUTLIER_HIGH:g} x or < 1/{OUTLIER_LOW:g} "
                  f"of the median over the optimizer's tensors at that step (at least "
                  f"{OUTLIER_MIN_TENSORS} tensors other than biases and norm parameters; "
                  f"zero-started ones judged after {ZERO_START_STEPS} steps)",
        reason="dividing by lr allows groups with different lrs; tensors of one model differ by "
               "10-60 x (LayerNorm gains, with large norms, move slower than weight matrices), "
               "not by a hundred or a thousand",
        explanation=EXPLAIN_RATIO,
        needs="per-tensor update_to_param (JSONL, or TensorBoard with params=True)")

    def __init__(self) -> None:
        self.history = _History()

    def observe(self, step: Step) -> Iterable[Verdict]:
        judged = []
        for s in moving(step):
            if s.tensor is None or not _matrix_like(s):
                continue
            self.history.see(s, step.t)
            r = ratio(s.stats)
            if (r is None or not math.isfinite(r) or r <= 0 or not s.group.lr > 0
                    or self.history.young_from_zero(s.name, step.t)):
                continue
            judged.append((s, r / s.group.lr))
        if len(judged) < OUTLIER_MIN_TENSORS:
            return
        median = statistics.median(value for _, value in judged)
        for s, value in judged:
            factor = value / median
            message = None
            if factor > OUTLIER_HIGH:
                message = (f"update_to_param {ratio(s.stats):.3g}, {factor:.0f} x the run's median "
                           "(per unit lr)")
            elif factor < 1 / OUTLIER_LOW:
                message = (f"update_to_param {ratio(s.stats):.3g}, 1/{1 / factor:.0f} of the run's "
                           "median (per unit lr): frozen in effect")
            yield Verdict(s.name, message)


class Divergence(RuleLogic):
    rule = Rule(
        id="divergence", severity="warning",
        title="parameter norm growing without bound",
        threshold=f"||theta|| of a tensor or group >= {DIVERGENCE_GROWTH:g} x its first measured "
                  "value (tensors that started from zero are left out)",
        reason="trained weights stay within a few times their initial norm (the demo's largest "
               "growth is 1.8 x); ten times is runaway growth",
        explanation=(
            "The parameters' norm keeps growing: training is diverging or about to. Usual "
            "causes: an lr too high for this model or batch size (often visible as "
            "update_ratio_high first), no or too short a warmup, no weight decay on a "
            "scale-invariant tensor whose norm grows with every step, or an unstable loss. "
            "Lower the lr, add warmup, clip gradients, add weight decay or normalisation."),
        needs="param_norm over the measured steps")

    def __init__(self) -> None:
        self.history = _History()

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in subjects(step):
            norm = s.stats.param_norm
            if norm is None or not math.isfinite(norm):
                continue
            self.history.see(s, step.t)
            first = self.history.first_norm.get(s.name)
            if first is None or self.history.started_at_zero(s.name):
                continue
            growth = norm / first
            yield Verdict(s.name, f"||theta|| grew {growth:.3g} x since step "
                                  f"{self.history.first_t[s.name]} ({first:.3g} -> {norm:.3g})"
                          if growth >= DIVERGENCE_GROWTH else None)


class DecayOnNormsAndBiases(RuleLogic):
    rule = Rule(
        id="decay_on_norms_and_biases", severity="warning",
        title="decoupled weight decay on norms and biases",
        threshold=f"a group with weight_decay_rate > 0 holds tensors of <= {VECTOR_NDIM} dimension "
                  f"(by shape; by name where the logs have no shapes: {', '.join(NORM_OR_BIAS_NAMES)})",
        reason="decay pulls a tensor towards 0; for a norm's gain that is not regularisation but a "
               "shrinking layer output, and biases are too few parameters to overfit with",
        explanation=(
            "Decoupled weight decay (AdamW, Keras' weight_decay) shrinks every tensor of the "
            "group towards zero by weight_decay_rate per step. On the gains and biases of "
            "LayerNorm/BatchNorm/RMSNorm and on biases this is not useful regularisation: it "
            "shrinks the normalised activations and fights what the layer learns. The usual "
            "recipe (BERT, GPT-2, timm, Hugging Face's Trainer) uses two parameter groups: "
            "weight matrices and embeddings with weight_decay, biases and norm parameters "
            "(param.ndim <= 1) with weight_decay=0. torch's Adam(weight_decay=) is coupled L2 "
            "instead (part of the gradient): it is not reported as a decay rate and not "
            "checked here."),
        needs="weight_decay_rate and the tensors' shapes (JSONL) or names (TensorBoard, params=True)")

    def observe(self, step: Step) -> Iterable[Verdict]:
        for group in step.groups:
            if not group.params or not group.weight_decay_rate > 0:
                if group.params:
                    yield Verdict(f"{step.prefix}/{group.name}", None)
                continue
            decided = [(name, *_is_vector(name, stats)) for name, stats in group.params.items()]
            vectors = [name for name, vector, _ in decided if vector]
            how = "by name" if any(how == "name" for _, _, how in decided) else "by shape"
            listed = ", ".join(vectors[:4]) + (f" and {len(vectors) - 4} more" if len(vectors) > 4 else "")
            yield Verdict(f"{step.prefix}/{group.name}",
                          f"weight_decay_rate {group.weight_decay_rate:.3g} per step on "
                          f"{len(vectors)} bias/norm tensor(s) ({how}): {listed}" if vectors else None)


class DecayExceedsUpdate(RuleLogic):
    rule = Rule(
        id="decay_exceeds_update", severity="warning",
        title="weight decay removes more per step than the update adds",
        threshold=f"update_to_param within {DECAY_DOMINATED_BAND:.0%} of rate / (1 - rate), the "
                  f"ratio decay alone gives (but not equal to it: that is no_gradient), at every "
                  f"measured step over >= {DECAY_EXCEEDS_STEPS} steps, while ||theta|| shrinks",
        reason="the norms bound the gradient part without separating it: within 2%, it is at most "
               "a fifth of the decay (a fiftieth if aligned with it); a healthy run's balance of "
               "gradient and decay passes through that band at isolated steps only, and twenty "
               "steps are no coincidence",
        explanation=(
            "Decoupled weight decay removes weight_decay_rate = lr * weight_decay of the "
            "tensor every step; here that is most of what happens to it: the gradient update "
            "is much smaller, so the tensor shrinks step after step until its norm is small "
            "enough for the gradients to balance the decay, and what it learns is decayed "
            "away. Usual causes: a weight_decay meant for coupled L2 or for another convention "
            "(some implementations do not multiply it by lr; 0.01-0.1 is usual for AdamW, 10 "
            "or more almost always a mistake), or gradients that have become tiny. Lower "
            "weight_decay, or check the gradients."),
        needs="weight_decay_rate, update_to_param and param_norm over the measured steps")

    def __init__(self) -> None:
        self.streaks = Streaks()
        self.first_norm: dict[str, float] = {}

    def observe(self, step: Step) -> Iterable[Verdict]:
        for s in moving(step):
            excess = decay_excess(s.stats, s.group.weight_decay_rate)
            norm = s.stats.param_norm
            if excess is None or norm is None or not math.isfinite(norm):
                continue
            dominated = DECAY_ONLY_TOLERANCE < abs(excess) <= DECAY_DOMINATED_BAND
            first = self.first_norm.get(s.name, norm)
            since = self.streaks.update(s.name, dominated and norm <= first, step.t)
            if since is None:
                self.first_norm[s.name] = norm  # the norm a streak starting next is judged against
                yield Verdict(s.name, None)
                continue
            if step.t - since < DECAY_EXCEEDS_STEPS:
                continue
            yield Verdict(s.name, f"the update is the decay ({s.group.weight_decay_rate:.3g} of the "
                                  f"tensor per step) to within {abs(excess):.1%}; ||theta|| "
                                  f"{first:.3g} -> {norm:.3g} since step {since}", since=since)


RULES = [UpdateRatioHigh, UpdateRatioOutlier, Divergence, DecayOnNormsAndBiases, DecayExceedsUpdate]
for _rule in RULES:
    _rule.measured_only = True  # every rule here reads the distributions
