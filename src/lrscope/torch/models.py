"""Muon and third-party PyTorch optimizers, registered with ``lrscope.register`` like any
user's model (the formulas are in ``lrscope.formulas``: ``muon``, ``prodigy``,
``dadapt_adam``, ``dadapt_sgd``, ``dadapt_adagrad``, ``dadapt_lion``, ``dadapt_adan``,
``schedule_free``).

A third-party class is registered as ``"module:Qualname"``: lrscope never imports
``prodigyopt``, ``dadaptation`` or ``schedulefree``; once the user has, the class itself is
matched (by identity, along its MRO).  What each hook reads is checked against the
packages' sources (prodigyopt 1.1, dadaptation 3.2, schedulefree 1.4):

* Prodigy, D-Adaptation: the step size ``d * lr`` uses ``d`` as the step began (the step
  overwrites ``group["d"]``: ``watch()`` records it), the largest lr over the groups
  (DAdaptAdaGrad, DAdaptAdan: the first group's), and the first group's betas, bias
  correction, ``decouple`` and momentum, as their ``step()`` does; a step that returned early
  (all gradients zero: ``group["k"]`` did not advance) did not move the parameters.
* schedule-free (the main classes, ``AdamWScheduleFreePaper``, the ``*Reference`` and
  ``*Closure`` classes): the lr is ``group["scheduled_lr"]``, the averaging weight ``ckp1``
  is recomputed from ``k``, ``r``, ``lr_max``, ``weight_lr_power`` and ``weight_sum`` as the
  step computed it; the class says which of the family's rules applies (``paper``,
  ``reference``, ``closure``).  The wrappers are read through their base optimizer
  (``lrscope.torch.schedule_free``).
* Muon: ``d`` is torch's own Newton-Schulz function run again on the momentum input
  rebuilt from the state (``lrscope.formulas.muon``).  Without that private function
  (another torch release), Muon is left unregistered and reported as not modelled.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from lrscope import registry
from lrscope.formulas import schedule_free
from lrscope.torch import bnb, muons, variants
from lrscope.torch.state import as_float

#: A state hook keeping only the formula's inputs: the others (Prodigy's sliced ``s`` and
#: ``p0``, D-Adaptation's sums) need not travel with the state, nor be batched.
StateHook = Callable[[dict[str, Any], torch.Tensor, dict[str, Any]], dict[str, Any]]


def keep(*names: str) -> StateHook:
    """A ``state`` hook keeping ``names`` (those present), ``param`` and ``grad``."""
    wanted = set(names) | {"param", "grad"}
    return lambda view, param, h: {k: v for k, v in view.items() if k in wanted}


def _first(step: registry.GroupStep) -> dict[str, Any]:
    return step.optimizer.param_groups[0]


def _advanced(step: registry.GroupStep) -> None:
    """``Unknown`` where the step returned before moving the parameters (Prodigy and
    D-Adaptation do when every gradient is zero: their ``k`` stays)."""
    if step.before is not None and step.before.get("k") == step.after.get("k"):
        raise registry.Unknown("the step returned early (all gradients zero): the parameters did not move")


def _applied_d(step: registry.GroupStep) -> Any:
    """The ``d`` the step applied: recorded before the step, or ``d0`` at the first step."""
    if step.before is None and step.t == 1 and "d0" in step.after:
        return step.after["d0"]
    return step.recorded("d", " (the step replaces it by the next step's estimate)")


def _max_lr(step: registry.GroupStep) -> float:
    return max(as_float(lr) for lr in step.lrs)


def prodigy_scalars(step: registry.GroupStep) -> dict[str, Any]:
    _advanced(step)
    first = _first(step)
    return {"lr": _max_lr(step), "d": _applied_d(step), "d_next": step.after["d"], "betas": first["betas"],
            "use_bias_correction": first["use_bias_correction"], "decouple": first["decouple"]}


def dadapt_adam_scalars(step: registry.GroupStep) -> dict[str, Any]:
    return prodigy_scalars(step)


def dadapt_sgd_scalars(step: registry.GroupStep) -> dict[str, Any]:
    _advanced(step)
    return {"lr": _max_lr(step), "d": _applied_d(step), "d_next": step.after["d"],
            "g0_norm": step.after["g0_norm"], "momentum": _first(step)["momentum"]}


def dadapt_adagrad_scalars(step: registry.GroupStep) -> dict[str, Any]:
    _advanced(step)
    if any(p.grad is not None and p.grad.is_sparse for p in step.after["params"]):
        raise registry.Unknown("DAdaptAdaGrad's sparse-gradient path is not modelled")
    return {"lr": as_float(step.lrs[0]), "d": _applied_d(step), "d_next": step.after["d"],
            "momentum": _first(step)["momentum"]}


def dadapt_lion_scalars(step: registry.GroupStep) -> dict[str, Any]:
    _advanced(step)
    return {"lr": _max_lr(step), "d": _applied_d(step), "d_next": step.after["d"], "betas": _first(step)["betas"]}


def dadapt_adan_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """The first group's lr and betas, as DAdaptAdan's ``step`` reads them."""
    _advanced(step)
    beta1, beta2, beta3 = _first(step)["betas"]
    return {"lr": as_float(step.lrs[0]), "d": _applied_d(step), "d_next": step.after["d"],
            "betas": (beta1, beta2), "beta3": beta3}


def schedule_free_scalars(kind: str) -> Callable[[registry.GroupStep], dict[str, Any]]:
    """The hook of ``AdamWScheduleFree`` (``"adamw"``), ``AdamWScheduleFreePaper``
    (``"paper"``), ``SGDScheduleFree`` (``"sgd"``), ``RAdamScheduleFree`` (``"radam"``) or
    the reference and closure classes (``"adamw-reference"``, ``"sgd-closure"``, ...)."""

    def scalars(step: registry.GroupStep) -> dict[str, Any]:
        group = step.after
        t = group["k"]
        ckp1 = schedule_free.averaging_weight(t, group["lr_max"], group["weight_sum"], group["r"],
                                              group["weight_lr_power"])
        if kind.startswith("sgd"):
            beta1, beta2, adaptive = group["momentum"], 0.0, False
        else:
            beta1, beta2 = group["betas"]
            adaptive = not kind.startswith("radam") or _rectified(beta2, t)
        return {"lr": group["scheduled_lr"], "ckp1": ckp1, "betas": (beta1, beta2), "adaptive": adaptive,
                "train_mode": group.get("train_mode", True), "bias_correction": kind != "paper",
                "reference": kind.endswith("reference"), "closure": kind.endswith("closure")}

    return scalars


def _rectified(beta2: float, t: int) -> bool:
    """Whether RAdamScheduleFree's step ``t`` took the Adam step (rho_t > 4), as it computes it."""
    beta2_t = beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    return t > 0 and rho_inf - 2 * t * beta2_t / (1 - beta2_t) > 4.0


def muon_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """O, the orthogonalized update of the step, by torch's own Newton-Schulz function on
    the input rebuilt from the state after the step; ``shape`` the global matrix's (a
    DTensor's ``shape`` is global)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    grad, buffer = view["grad"], view["momentum_buffer"]
    update = grad.lerp(buffer, h["momentum"]) if h["nesterov"] else buffer
    ortho = _zeropower_via_newtonschulz(update, h["ns_coefficients"], h["ns_steps"], h["eps"])
    return {"param": view["param"], "orthogonalized": ortho.to(view["param"].dtype), "shape": tuple(param.shape)}


def _muon_available() -> bool:
    """torch.optim.Muon exists, with the Newton-Schulz function ``muon_state`` calls."""
    try:
        module = importlib.import_module("torch.optim._muon")
    except ImportError:
        return False
    return hasattr(torch.optim, "Muon") and hasattr(module, "_zeropower_via_newtonschulz")


_SCHEDULE_FREE_NEUTRAL = ("k", "weight_sum", "lr_max", "scheduled_lr", "weight_lr_power", "r",
                          "warmup_steps")
_D_NEUTRAL = ("k", "d0", "d_max", "d_hat", "d_numerator", "d_denom", "d_coef", "growth_rate",
              "beta3", "safeguard_warmup", "slice_p", "fsdp_in_use", "numerator_weighted",
              "log_every", "gsq_weighted", "sksq_weighted", "skl1")


def register_builtin() -> None:
    """Register the models of this module (called once by ``lrscope.torch``)."""
    if _muon_available():
        registry.register(torch.optim.Muon, "muon", state=muon_state)
    registry.register("prodigyopt:Prodigy", "prodigy", scalars=prodigy_scalars,
                      state=keep("exp_avg", "exp_avg_sq"), neutral=_D_NEUTRAL, counter="k",
                      lr_source="max(lr)")
    registry.register("dadaptation:DAdaptAdam", "dadapt_adam", scalars=dadapt_adam_scalars,
                      state=keep("exp_avg", "exp_avg_sq"), neutral=_D_NEUTRAL, counter="k",
                      lr_source="max(lr)")
    registry.register("dadaptation:DAdaptSGD", "dadapt_sgd", scalars=dadapt_sgd_scalars,
                      state=keep("z"), neutral=_D_NEUTRAL, counter="k", lr_source="max(lr)")
    registry.register("dadaptation:DAdaptAdaGrad", "dadapt_adagrad", scalars=dadapt_adagrad_scalars,
                      state=keep("alphak", "sk", "x0"), neutral=_D_NEUTRAL, counter="k",
                      lr_source="lr of the first group")
    registry.register("dadaptation:DAdaptLion", "dadapt_lion", scalars=dadapt_lion_scalars,
                      state=keep("exp_avg"), neutral=_D_NEUTRAL, counter="k", lr_source="max(lr)")
    registry.register("dadaptation:DAdaptAdan", "dadapt_adan", scalars=dadapt_adan_scalars,
                      state=keep("exp_avg", "exp_avg_diff", "exp_avg_sq"), neutral=_D_NEUTRAL, counter="k",
                      lr_source="lr of the first group")
    for qualname, kind in (("AdamWScheduleFree", "adamw"), ("AdamWScheduleFreePaper", "paper"),
                           ("AdamWScheduleFreeReference", "adamw-reference"), ("SGDScheduleFree", "sgd"),
                           ("SGDScheduleFreeReference", "sgd-reference"), ("RAdamScheduleFree", "radam"),
                           ("AdamWScheduleFreeClosure", "adamw-closure"), ("SGDScheduleFreeClosure", "sgd-closure"),
                           ("RAdamScheduleFreeClosure", "radam-closure")):
        registry.register(f"schedulefree:{qualname}", "schedule_free", scalars=schedule_free_scalars(kind),
                          state=keep("z", "exp_avg_sq", "x", "y"), counter="k", lr_source="scheduled_lr",
                          neutral=_SCHEDULE_FREE_NEUTRAL + (("momentum",) if kind.startswith("sgd") else ())
                          + (("silent_sgd_phase",) if kind.startswith("radam") else ()))
    variants.register()  # Lion and the Adam variants of timm, pytorch_optimizer, lion-pytorch
    bnb.register()  # bitsandbytes' Adam, AdamW, Lion and AdEMAMix
    muons.register()  # timm's and pytorch_optimizer's Muon
