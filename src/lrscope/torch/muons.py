"""timm's and pytorch_optimizer's Muon, registered with ``lrscope.register`` (family
``muon_adamw``: Muon for the matrices, AdamW for the other tensors; ``torch.optim.Muon`` is
in ``lrscope.torch.models``).

Both classes are registered as ``"module:Qualname"``: lrscope imports neither package; once
the user has, the class itself is matched.  What the hooks read is checked against the
packages' sources (timm 1.0.31, pytorch_optimizer 4.1.0):

* timm routes each tensor on its first step and caches the choice in ``state["use_muon"]``;
  its Muon path leaves the gradient as it was (``u = lerp(g, B, momentum)`` with nesterov);
  its fallback is NAdamW where the group's ``nesterov`` is set, else AdamW, with the lr
  ``lr * fallback_lr_scale``.  With ``algo="adamuon"`` (AdaMuon) the Muon path divides O by
  ``sqrt(v) + eps``, v a second moment of O (``state["exp_avg_sq"]``), and by the RMS of
  the result where its scale says so.
* pytorch_optimizer routes by the group's ``use_muon``; it writes ``u`` over the gradient
  with nesterov (``lerp_`` in place), negates it for ``maximize`` and adds coupled decay to
  it (``weight_decouple=False``) before the momentum, so the gradient after the step is
  ``u`` and no decay is left outside it.  Its AdamW groups are AdamW with their own lr.

The orthogonalized update is each package's own Newton-Schulz function run again, with the
group's options, on ``u`` rebuilt from the state after the step (same function, same
inputs: the step's ``O``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from lrscope import registry

#: ``update -> (O in the update's shape, the lr scale of the matrix O was computed on,
#: whether the step divides by the RMS of the adapted update: AdaMuon's)``.
NewtonSchulz = Callable[[torch.Tensor], "tuple[torch.Tensor, float, bool]"]


def _fallback_view(view: dict[str, Any]) -> dict[str, Any]:
    return {"use_muon": False, **{k: view[k] for k in ("exp_avg", "exp_avg_sq", "param", "grad")}}


def _muon_view(view: dict[str, Any], update: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    ortho, scale, rms_norm = h["newton_schulz"](update)
    muon = {"use_muon": True, "orthogonalized": ortho.to(view["param"].dtype), "lr_scale": scale,
            "param": view["param"], "grad": view["grad"]}
    if h["algo"] == "adamuon":
        muon.update(exp_avg_sq=view["exp_avg_sq"], rms_norm=rms_norm)
    return muon


# -- timm ------------------------------------------------------------------------------------------

def _timm_newton_schulz(group: dict[str, Any]) -> NewtonSchulz:
    """timm's orthogonalization and lr scale of one tensor, as its ``_single_tensor_muon``."""
    module = sys.modules["timm.optim.muon"]
    coefficients = module.resolve_ns_coefficients(group["ns_coefficients"], module._COEFFICIENTS)
    conv_mode, adjust = group["conv_mode"], group["adjust_lr_fn"]

    def orthogonalize(update: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        matrix = module.reshape_for_muon(update, mode=conv_mode)[0] if update.ndim >= 3 else update
        ortho = module.zeropower_via_newtonschulz(matrix, group["ns_steps"], coefficients, eps=group["eps"],
                                                  safety_factor=group["safety_factor"],
                                                  scale_eps=group["scale_eps"])
        scale, rms_norm = 1.0, False
        if adjust and group["algo"] == "adamuon":
            scale, rms_norm = module.get_adamuon_lr_scale(ortho.shape, adjust)
        elif adjust:
            scale = module.get_lr_scale(ortho.shape, adjust)
        if conv_mode == "batched" and ortho.ndim >= 3:
            if group["normalize_spatial"]:  # (the spatial size: AdaMuon's original_shape[2:])
                scale *= ortho.shape[0] ** -0.5
            ortho = ortho.permute(1, 2, 0)
        return ortho.reshape(update.shape), scale, rms_norm

    return orthogonalize


def timm_scalars(step: registry.GroupStep) -> dict[str, Any]:
    group = step.after
    return {"fallback": "nadamw" if group["nesterov"] else "adamw",
            "newton_schulz": _timm_newton_schulz(group)}


def timm_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """The tensor's rule from ``state["use_muon"]``; on the Muon path O and its lr scale."""
    if not view.get("use_muon"):
        return _fallback_view(view)
    grad, buffer = view["grad"], view["momentum_buffer"]
    return _muon_view(view, grad.lerp(buffer, h["momentum"]) if h["nesterov"] else buffer, h)


_TIMM_NEUTRAL = ("ns_steps", "ns_coefficients", "safety_factor", "adjust_lr_fn", "conv_mode",
                 "normalize_spatial", "scale_eps", "verbose", "use_fallback", "use_muon")


# -- pytorch_optimizer ---------------------------------------------------------------------------------

def _po_newton_schulz(group: dict[str, Any]) -> NewtonSchulz:
    """pytorch_optimizer's orthogonalization (``MuonBase._orthogonalize``) and lr scale
    (``get_adjusted_lr``) of one tensor."""
    module = sys.modules["pytorch_optimizer.optimizer.muon.base"]

    def orthogonalize(update: torch.Tensor) -> tuple[torch.Tensor, float]:
        ortho = module.MuonBase._orthogonalize(group, [update])[0]
        scale = module.get_adjusted_lr(1.0, update.shape, group["use_adjusted_lr"])
        return ortho.reshape(update.shape), scale, False

    return orthogonalize


def po_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """Coupled decay (``weight_decouple=False``) is inside the gradient: 0 for the formula."""
    group = step.after
    decay = group["weight_decay"] if group["weight_decouple"] else 0.0
    if not group["use_muon"]:
        return {"weight_decay": decay}
    return {"weight_decay": decay, "newton_schulz": _po_newton_schulz(group)}


def po_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """The Muon path where the tensor has a momentum buffer (a ``use_muon`` group's): ``u`` is
    the gradient after the step (nesterov) or the buffer."""
    if "momentum_buffer" not in view:
        return _fallback_view(view)
    return _muon_view(view, view["grad"] if h["nesterov"] else view["momentum_buffer"], h)


_PO_NEUTRAL = ("step", "weight_decouple", "use_muon", "use_adjusted_lr", "ns_steps", "ns_coeffs", "ns_method",
               "ns_reset_steps")


def register() -> None:
    """Register the models of this module (called once by ``lrscope.torch``)."""
    registry.register("timm.optim.muon:Muon", "muon_adamw", scalars=timm_scalars, state=timm_state,
                      neutral=_TIMM_NEUTRAL)
    registry.register("pytorch_optimizer.optimizer.muon.muon:Muon", "muon_adamw", scalars=po_scalars,
                      state=po_state, neutral=_PO_NEUTRAL, counter="step")


__all__ = ["register"]
