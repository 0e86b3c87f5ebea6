r"""Muon for the matrices, AdamW for the other tensors, in one optimizer (timm's and
pytorch_optimizer's ``Muon``).

Each tensor takes one of two rules, as the optimizer routed it (``state["use_muon"]``,
which the registration's state hook reads: timm caches its routing in the tensor's state,
pytorch_optimizer routes by the group's ``use_muon``)::

    muon:   B <- lerp(B, g, 1 - momentum);   u = lerp(g, B, momentum) if nesterov else B
            theta <- theta * (1 - lr * wd)                  # the *unadjusted* lr
            theta <- theta - lr * scale * NS(u)
    adamw:  AdamW (``lrscope.formulas.adam``) with the lr ``lr * fallback_lr_scale``, or
            timm's NAdamW (``lrscope.formulas.adamw_nesterov``) where ``fallback`` is "nadamw"

On the Muon path ``d = O = NS(u)``, the orthogonalized update the step applied, and eta is
one scalar per matrix, the adjusted lr ``lr * scale``; ``decay_rate = lr * wd``.  ``scale``
is each implementation's, of the matrix NS ran on (``state["lr_scale"]``):

* timm (``adjust_lr_fn``, of the update reshaped to (out, in), ``in`` the product of the
  other dimensions): "match_rms_adamw" (the default) ``0.2 * sqrt(max(out, in))``,
  "original" ``sqrt(max(1, out / in))``, "rms_to_rms" ``sqrt(out / in)``, None 1; with
  ``conv_mode="batched"`` and ``normalize_spatial``, times ``spatial ** -0.5``;
* pytorch_optimizer (``use_adjusted_lr``, (out, in) as timm's): True ``0.2 * sqrt(max(out,
  in))``, False ``sqrt(max(1, out / in))``.

timm's AdaMuon (``algo="adamuon"``) adapts the Muon path by a second moment of O, with
``v <- beta2 * v + (1 - beta2) * O**2`` (``state["exp_avg_sq"]``, t the tensor's
``state["step"]``)::

    theta <- theta - lr * scale * O / (D * N),   D = sqrt(v_hat) + eps
    N = ||O / D|| + eps where ``state["rms_norm"]`` (then v is not bias-corrected), else 1

so ``eta = lr * scale / (D * N)`` per element and ``d = O``.  timm's AdaMuon scales
(``get_adamuon_lr_scale``): "match_rms_adamw" (the default) ``0.2 * sqrt(numel)`` with
the RMS division, "rms_to_rms" ``sqrt(out / in)``, "rsqrt_in" ``in ** -0.5``, None 1.

``O`` is not in the optimizer's state: the state hook runs the implementation's own
Newton-Schulz function (``h["newton_schulz"]``, built from the group's options by the
registration) on ``u``, rebuilt from the state after the step, which gives the step's ``O``
(same function, same inputs; computed, not measured).  Reported: ``step_size = lr`` (each
matrix's adjusted lr is its eta; the AdamW tensors' own step size is in their eta), and the
group's ``weight_decay_rate`` is that of the Muon path, ``lr * wd``.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 0.02, "weight_decay": 0.1}
>>> O = np.ones((4, 8))
>>> el = elementwise(np, {"use_muon": True, "orthogonalized": O, "lr_scale": 0.5}, 1, h, "torch")
>>> el.eta, round(el.decay_rate, 6)
(0.01, 0.002)
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas import adam, adamw_nesterov
from lrscope.formulas._common import Elementwise

NAMES = ("muon_adamw",)
#: The Muon path reads no t; the AdamW tensors read their own counter from their state.
USES_STEP = False
#: eta and O need the whole matrix.
CHUNKABLE = False
FALLBACKS = ("adamw", "nadamw")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 0.02, "weight_decay": 0.0, "momentum": 0.95, "nesterov": False, "beta1": 0.9,
              "beta2": 0.95, "eps": 1e-7, "fallback_lr_scale": 1.0, "fallback": "adamw",
              "algo": "muon", "newton_schulz": None},
}


ALGORITHMS = ("muon", "adamuon")


def unsupported(h: Mapping[str, Any]) -> list[str]:
    """An ``algo`` other than timm's "muon" and "adamuon", or an unknown fallback."""
    unknown = [] if h["algo"] in ALGORITHMS else [f"algo={h['algo']!r}"]
    return unknown + ([] if h["fallback"] in FALLBACKS else [f"fallback={h['fallback']!r}"])


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``: the Muon path's lr, before each matrix's scale."""
    return {"step_size": h["lr"]}


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``lr * wd``, the Muon path's (the AdamW tensors' is in their Elementwise)."""
    return h["lr"] * h["weight_decay"]


def fallback_hyperparameters(h: Mapping[str, Any]) -> dict[str, Any]:
    """The AdamW (NAdamW) hyperparameters of the other tensors: lr ``lr * fallback_lr_scale``."""
    lr = h["lr"] * h["fallback_lr_scale"]
    common = {"lr": lr, "beta1": h["beta1"], "beta2": h["beta2"], "eps": h["eps"],
              "weight_decay": h["weight_decay"], "maximize": False}
    if h["fallback"] == "nadamw":
        return {**common, "decay_lr": None}
    return {**common, "amsgrad": False, "decoupled_weight_decay": True}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """The Muon rule (eta = ``lr * state["lr_scale"]``, d = ``state["orthogonalized"]``)
    or the fallback's, by ``state["use_muon"]``."""
    if state["use_muon"] and h["algo"] == "adamuon":
        return _adamuon(xp, state, t, h)
    if state["use_muon"]:
        return Elementwise(eta=h["lr"] * state["lr_scale"], direction=state["orthogonalized"],
                           decay_rate=decay_rate(h))
    family = adamw_nesterov if h["fallback"] == "nadamw" else adam
    return family.elementwise(xp, state, t, fallback_hyperparameters(h), "torch")


def _adamuon(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """AdaMuon's Muon path: eta = lr * scale / (D * N), d = O."""
    ortho, v = state["orthogonalized"], state["exp_avg_sq"]
    root = xp.sqrt(v) if state["rms_norm"] else xp.sqrt(v / (1 - h["beta2"] ** t))
    denom = root + h["eps"]
    eta = h["lr"] * state["lr_scale"] / denom
    if state["rms_norm"]:
        adapted = ortho / denom
        eta = eta / (xp.sqrt(xp.sum(adapted * adapted)) + h["eps"])
    return Elementwise(eta=eta, direction=ortho, decay_rate=decay_rate(h), eps_dominated=root < h["eps"])
