"""Rules for particular optimizer families: Muon beside Adam, Prodigy / D-Adaptation's d."""

from __future__ import annotations

import math
import statistics
from typing import Iterable

from lrscope.findings.core import Rule, RuleLogic, Verdict
from lrscope.findings.observe import Step

#: Muon's per-element update RMS differs from the Adam tensors' by more than this factor.
#: Reason: Moonlight (Liu et al., "Muon is Scalable for LLM Training", 2025) scales Muon's
#: update (0.2 sqrt(max(A, B))) to match AdamW's typical update RMS so that both share the lr
#: and the weight decay; an order of magnitude apart, one set of tensors trains ten times
#: faster than the other. An info: the original Muon recipe tunes the two lrs separately.
MUON_RMS_FACTOR = 10.0
#: Families and optimizer names taken as Adam-like in that comparison.
ADAM_LIKE = ("adam", "adamw", "amsgrad", "nadam", "radam", "adamax", "sparse_adam")
#: Prodigy / D-Adaptation's d grew by more than this over the last ``D_WINDOW`` of the run.
#: Reason: d only grows, and once the run has found its lr scale it flattens (within the
#: first tenth or so of training in the Prodigy paper's runs); still growing by a tenth at the
#: end, the run spent its whole length below the lr that d was heading for.
D_GROWTH = 0.10
#: The last part of the run (a fraction of its steps) over which d's growth is measured.
D_WINDOW = 0.10


def _is_muon(step: Step) -> bool:
    return step.family == "muon" or "muon" in step.optimizer.lower()


def _is_adam(step: Step) -> bool:
    return step.family in ADAM_LIKE or (step.family is None and "adam" in step.optimizer.lower())


class MuonStepMismatch(RuleLogic):
    measured_only = True
    rule = Rule(
        id="muon_step_mismatch", severity="info",
        title="Muon's update far from the Adam tensors' update",
        threshold=f"the median per-element update RMS (||delta theta|| / sqrt(count)) of the Muon "
                  f"optimizer's matrices and that of the Adam-family tensors, at the same step, "
                  f"differ by more than {MUON_RMS_FACTOR:g} x",
        reason="Moonlight (2025) matches Muon's update RMS to AdamW's so both can share lr and "
               "weight decay; ten times apart, one set of tensors trains ten times faster. An info: "
               "the original Muon recipe tunes the two lrs separately",
        explanation=(
            "Muon orthogonalises each matrix's update, whose RMS is then about "
            "1 / sqrt(max(A, B)); each library scales its lr differently to compensate "
            "(torch: lr * sqrt(max(1, A/B)); Moonlight and Keras: lr * 0.2 * sqrt(max(A, B)), "
            "matching AdamW's update RMS; optax: lr * sqrt(max(1, fan_out/fan_in))). The "
            "matrices trained by Muon here move an order of magnitude more or less per step "
            "than the tensors trained by Adam (embeddings, head, biases, norms). If that is "
            "not deliberate, rescale one of the lrs, or use the adjustment that matches "
            "AdamW (torch.optim.Muon(adjust_lr_fn='match_rms_adamw'), the Moonlight scaling)."),
        needs="update norms and element counts of both optimizers (JSONL; a Muon from another "
              "library measured with empirical=True), written to one log; offline only when "
              "the two optimizers have separate monitors")

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, list[float]]] = {}  # kind -> (t, update RMSs)
        self.muon_groups: dict[str, list[str]] = {}

    def observe(self, step: Step) -> Iterable[Verdict]:
        kind = "muon" if _is_muon(step) else "adam" if _is_adam(step) else None
        if kind is None or not step.measured:
            return
        values = [p.update_rms for g in step.groups for p in g.params.values()
                  if p.update_rms and math.isfinite(p.update_rms)
                  and (kind == "adam" or p.shape is None or len(p.shape) >= 2)]
        if not values:
            return
        self.latest[kind] = (step.t, values)
        if kind == "muon":
            self.muon_groups[step.prefix] = [g.name for g in step.groups]
        if {"muon", "adam"} <= self.latest.keys() and self.latest["muon"][0] == self.latest["adam"][0]:
            muon = statistics.median(self.latest["muon"][1])
            adam = statistics.median(self.latest["adam"][1])
            factor = muon / adam
            far = factor > MUON_RMS_FACTOR or factor < 1 / MUON_RMS_FACTOR
            for prefix, groups in self.muon_groups.items():
                for group in groups:
                    yield Verdict(f"{prefix}/{group}", f"Muon's median update RMS {muon:.3g} is "
                                                       f"{factor:.3g} x the Adam tensors' {adam:.3g}"
                                  if far else None)


class AdaptiveDStillGrowing(RuleLogic):
    rule = Rule(
        id="adaptive_d_still_growing", severity="warning",
        title="Prodigy / D-Adaptation's d still growing at the end",
        threshold=f"a group's d (the family's reported scalar d) grew by more than {D_GROWTH:.0%} "
                  f"over the last {D_WINDOW:.0%} of the run's steps; judged at the end of the run "
                  "(lrscope check, or monitor.close())",
        reason="d only grows, and flattens once the run has found its lr scale; still growing at "
               "the end, the whole run was trained below the lr d was heading for",
        explanation=(
            "Prodigy and D-Adaptation estimate the distance to the solution, d, and step with "
            "d * lr; d starts tiny (d0 = 1e-6) and grows until it stops finding larger "
            "distances. Here d was still growing at the end of the run: the effective lr never "
            "settled, so most of the run trained below the lr the method was heading for. Try "
            "a longer run, a larger d0 (closer to the lr you expect), growth_rate=inf (the "
            "default) rather than a small one, or check that an lr schedule or warmup does "
            "not hold d back (Prodigy's safeguard_warmup=True with warmup)."),
        needs="the reported scalar d of each group (Prodigy, D-Adaptation) over the run")

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float]]] = {}

    def observe(self, step: Step) -> Iterable[Verdict]:
        for g in step.groups:
            d = g.extra.get("d")
            if d is not None and math.isfinite(d) and d > 0:
                self.series.setdefault(f"{step.prefix}/{g.name}", []).append((step.t, d))
        return ()

    def finish(self) -> Iterable[Verdict]:
        for key, points in self.series.items():
            first_t, last_t = points[0][0], points[-1][0]
            start_t = last_t - max(1.0, D_WINDOW * (last_t - first_t))
            before = [p for p in points if p[0] <= start_t]
            if not before:
                continue
            t0, d0 = before[-1]
            d1 = points[-1][1]
            growth = d1 / d0 - 1
            if growth > D_GROWTH:
                yield Verdict(key, f"d grew {growth:.0%} over the last steps ({d0:.3g} at step {t0} "
                                   f"-> {d1:.3g} at step {last_t})", since=t0, until=last_t)
            else:
                yield Verdict(key, None)


RULES = [MuonStepMismatch, AdaptiveDStillGrowing]
