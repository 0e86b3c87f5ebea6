"""Lion and the Adam variants of timm, pytorch_optimizer and lion-pytorch (bitsandbytes':
``lrscope.torch.bnb``), registered with ``lrscope.register`` like every other model.

Each class is registered as ``"module:Qualname"``: lrscope imports none of these packages;
once the user has, the class itself is matched (by identity, along its MRO).  The family
formulas are in ``lrscope.formulas`` (``lion``, ``adamw``, ``adamw_nesterov``, ``laprop``,
``adopt``, ``adan``, ``lamb``, ``mars``, ``ademamix``); the hooks here only translate each
package's options into the family's hyperparameters, checked against the packages'
sources (timm 1.0.31, pytorch_optimizer 4.1.0, lion-pytorch 0.2.5):

* timm's ``corrected_weight_decay`` scales the decay by ``lr**2 / max_lr_snapshot``
  (``decay_lr``); ``caution`` and ``clipping_threshold`` are not modelled (an option set to
  a value other than its default is reported, and the group's distributions skipped).
* pytorch_optimizer keeps t in ``group["step"]``; its ``maximize`` (an attribute, not a
  group key) and its coupled weight decay change ``p.grad`` in place, so the gradient the
  formula reads after the step is the one the step used; ``fixed_decay`` does not scale
  the decay by lr.  Its extra options (``cautious``, ``use_gc``, ``adanorm``,
  ``stable_adamw``, ...) are group keys and are reported when set.  Its LaProp and MARS add
  eps to ``sqrt(v + 1e-15)`` before the bias correction (``raw_eps``, ``eps_root``), its
  LaProp rounds the step size to float32 on the batched path, its Lamb keeps the trust
  ratio in the state and multiplies the update by ``lr / (1 - beta1**t)``.
* lion-pytorch's ``decoupled_weight_decay`` divides wd by the initial lr (an attribute).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lrscope import registry

def _lr(step: registry.GroupStep) -> Any:
    return step.lrs[step.index]


# -- timm ----------------------------------------------------------------------------------

def timm_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """``decay_lr = lr**2 / max_lr_snapshot`` where ``corrected_weight_decay``."""
    group = step.after
    if not group.get("corrected_weight_decay"):
        return {}
    return {"decay_lr": _lr(step) ** 2 / group["max_lr_snapshot"]}


def timm_adamw_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """AdamWLegacy through the ``adamw`` family, which scales decay by lr: the corrected
    decay ``lr**2 / max_lr * wd`` as ``lr * (wd * lr / max_lr)``."""
    group = step.after
    if not group.get("corrected_weight_decay"):
        return {}
    return {"weight_decay": group["weight_decay"] * _lr(step) / group["max_lr_snapshot"]}


def timm_lamb_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """The corrected decay applies only where decoupled, as in timm's ``step``."""
    group = step.after
    return timm_scalars(step) if group.get("decoupled_decay") else {}


def timm_adan_scalars(step: registry.GroupStep) -> dict[str, Any]:
    beta1, beta2, beta3 = step.after["betas"]
    return {"betas": (beta1, beta2), "beta3": beta3}


def mars_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """Which of MARS's rules the tensor took: ``grad.ndim >= 2``."""
    return {"exp_avg": view["exp_avg"], "exp_avg_sq": view["exp_avg_sq"], "param": view["param"],
            "grad": view["grad"], "matrix": param.dim() >= 2}


_TIMM_NEUTRAL = ("max_lr_snapshot", "corrected_weight_decay")


# -- pytorch_optimizer -----------------------------------------------------------------------

def _decay(group: dict[str, Any]) -> dict[str, Any]:
    """pytorch_optimizer's decay: decoupled (scaled by lr, or by 1 with ``fixed_decay``), or
    coupled, added to ``p.grad`` in place (then in the gradient the formula reads: 0 here)."""
    decoupled = group.get("weight_decouple", False)
    return {"weight_decay": group["weight_decay"] if decoupled else 0.0,
            "decay_lr": 1.0 if decoupled and group.get("fixed_decay") else None}


def po_lion_scalars(step: registry.GroupStep) -> dict[str, Any]:
    return _decay(step.after)


def po_adopt_scalars(step: registry.GroupStep) -> dict[str, Any]:
    group = step.after
    return {**_decay(group), "decoupled": bool(group.get("weight_decouple")), "first_step_decay": True}


def po_adan_scalars(step: registry.GroupStep) -> dict[str, Any]:
    beta1, beta2, beta3 = step.after["betas"]
    return {"betas": (beta1, beta2), "beta3": beta3, "no_prox": bool(step.after["weight_decouple"])}


def po_lamb_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """Its step size ``lr / (1 - beta1**t)`` (``lamb``'s lr, without the family's bias
    corrections), the trust ratio from the state (``state["trust_ratio"]``), its decay as
    ``_decay`` (coupled: in the update, scaled by that step size)."""
    group = step.after
    decoupled = bool(group["weight_decouple"])
    return {"lr": _lr(step) / (1 - group["betas"][0] ** group["step"]), "bias_correction": False,
            "always_adapt": True, "decoupled_decay": decoupled,
            "decay_lr": (1.0 if group["fixed_decay"] else _lr(step)) if decoupled else None}


def po_laprop_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """eps on the raw ``sqrt(v + 1e-15)``; the step size rounded to float32 on the batched
    path (``foreach`` not False: the path its ``step`` takes for dense real gradients)."""
    group = step.after
    if _lr(step) == 0:
        raise registry.Unknown("pytorch_optimizer's LaProp steps by its whole momentum where lr is 0 "
                               "(step size 1): not modelled")
    return {**_decay(group), "raw_eps": True, "eps_root": _PO_EPS_ROOT,
            "float32_step_size": group.get("foreach") is not False}


def po_laprop_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """On the batched path, ``exp_avg_lr_1`` as ``lr`` over the float32 step size the step
    multiplied m by (its ``_get_step_sizes``), computed here on the host."""
    lr_average = view["exp_avg_lr_1"]
    if not h["float32_step_size"] or not lr_average:
        return view
    return {**view, "exp_avg_lr_1": h["lr"] / float(np.float32(1.0 / (lr_average / h["lr"])))}


def po_mars_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """eps on the raw ``sqrt(v + 1e-15)``; coupled decay is added to the gradient *after*
    the update (it reaches the next step's ``last_grad`` only): no decay in this step."""
    group = step.after
    decoupled = group["weight_decouple"]
    return {"raw_eps": True, "eps_root": _PO_EPS_ROOT, "fixed_decay": group["fixed_decay"],
            "weight_decay": group["weight_decay"] if decoupled else 0.0,
            "weight_decay_1d": group["weight_decay_1d"] if decoupled else 0.0}


def po_ademamix_scalars(step: registry.GroupStep) -> dict[str, Any]:
    group = step.after
    beta1, beta2, _ = group["betas"]
    return {**_decay(group), "betas": (beta1, beta2), "t_alpha": group.get("t_alpha_beta3")}


_PO_NEUTRAL = ("step", "weight_decouple", "fixed_decay")
_PO_EPS_ROOT = 1e-15  # pytorch_optimizer's apply_ams_bound: sqrt(v + 1e-15) + eps


# -- lion-pytorch -------------------------------------------------------------------------------

def lion_pytorch_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """``decoupled_weight_decay``: wd divided by the initial lr (``decay_lr = lr / lr_0``)."""
    optimizer = step.optimizer
    if getattr(optimizer, "decoupled_wd", False):
        return {"decay_lr": _lr(step) / optimizer._init_lr}
    return {}


def register() -> None:
    """Register the models of this module (called once by ``lrscope.torch``)."""
    reg = registry.register
    # timm (each class in its own module: registering waits for that module's import)
    reg("timm.optim.lion:Lion", "lion", scalars=timm_scalars, neutral=_TIMM_NEUTRAL)
    reg("timm.optim.adamw:AdamWLegacy", "adamw", scalars=timm_adamw_scalars, neutral=_TIMM_NEUTRAL)
    reg("timm.optim.nadamw:NAdamW", "adamw_nesterov", scalars=timm_scalars, neutral=_TIMM_NEUTRAL)
    reg("timm.optim.laprop:LaProp", "laprop", scalars=timm_scalars, neutral=_TIMM_NEUTRAL)
    reg("timm.optim.adopt:Adopt", "adopt", scalars=timm_scalars, neutral=_TIMM_NEUTRAL + ("clip_exp",))
    reg("timm.optim.adan:Adan", "adan", scalars=timm_adan_scalars, counter="step", neutral=("step",))
    reg("timm.optim.lamb:Lamb", "lamb", scalars=timm_lamb_scalars, counter="step",
        neutral=_TIMM_NEUTRAL + ("step",))
    reg("timm.optim.mars:Mars", "mars", state=mars_state)
    # pytorch_optimizer
    reg("pytorch_optimizer.optimizer.lion:Lion", "lion", scalars=po_lion_scalars, counter="step",
        neutral=_PO_NEUTRAL)
    reg("pytorch_optimizer.optimizer.adopt:ADOPT", "adopt", scalars=po_adopt_scalars, counter="step",
        neutral=_PO_NEUTRAL)
    reg("pytorch_optimizer.optimizer.adan:Adan", "adan", scalars=po_adan_scalars, counter="step",
        neutral=_PO_NEUTRAL + ("max_grad_norm",))
    reg("pytorch_optimizer.optimizer.laprop:LaProp", "laprop", scalars=po_laprop_scalars, state=po_laprop_state,
        counter="step", neutral=_PO_NEUTRAL)
    reg("pytorch_optimizer.optimizer.mars:MARS", "mars", scalars=po_mars_scalars, state=mars_state, counter="step",
        neutral=_PO_NEUTRAL + ("lr_1d",))
    reg("pytorch_optimizer.optimizer.lamb:Lamb", "lamb", scalars=po_lamb_scalars, counter="step",
        neutral=_PO_NEUTRAL, lr_source="lr/(1-beta1**t)")
    reg("pytorch_optimizer.optimizer.ademamix:AdEMAMix", "ademamix", scalars=po_ademamix_scalars,
        counter="step", neutral=_PO_NEUTRAL + ("t_alpha_beta3",))
    # lion-pytorch
    reg("lion_pytorch.lion_pytorch:Lion", "lion", scalars=lion_pytorch_scalars)


__all__ = ["register"]
