"""bitsandbytes' Adam, AdamW, Lion and AdEMAMix (8-bit, 32-bit and paged), registered with
``lrscope.register`` like every other model (families ``adamw``, ``lion``, ``ademamix``),
checked against bitsandbytes 0.50.2's sources.  lrscope never imports bitsandbytes: its
classes are registered as ``"module:Qualname"``.

* bitsandbytes keeps m and v in ``state1``/``state2``: float32 for tensors of fewer than
  ``min_8bit_size`` elements (and the 32-bit classes), else 8-bit codes per block of 256,
  which the state hook dequantizes with bitsandbytes' own ``dequantize_blockwise``.  The
  step used the float32 moments *before* they were quantized again, so on the 8-bit path
  eta and d carry the quantization error of the stored state (measured, not exact).
  ``max_unorm``, ``skip_zeros`` and per-parameter overrides (``GlobalOptimManager``) are
  not modelled: such a group is reported as unknown (NaN), with the reason.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from lrscope import registry

_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states


def bnb_scalars(step: registry.GroupStep) -> dict[str, Any]:
    """The options bitsandbytes keeps outside the group (``optimizer.args``, the
    ``GlobalOptimManager``'s per-parameter overrides) must be their defaults; AdEMAMix's
    three betas and alpha schedule."""
    optimizer = step.optimizer
    args = getattr(optimizer, "args", None)
    for name in ("max_unorm", "skip_zeros"):
        if getattr(args, name, 0):
            raise registry.Unknown(f"bitsandbytes' {name}={getattr(args, name)!r} is not modelled")
    manager = getattr(optimizer, "mng", None)
    params = step.after["params"]
    overridden = [i for i, p in enumerate(params) if id(p) in getattr(manager, "pid2config", {})
                  or (step.index, i) in getattr(manager, "index2config", {})]
    if overridden:
        raise registry.Unknown("bitsandbytes' per-parameter overrides (GlobalOptimManager."
                               "override_config) are not modelled")
    group = step.after
    if len(group["betas"]) == 3:
        beta1, beta2, _ = group["betas"]
        return {"betas": (beta1, beta2)}
    return {}


def _dequantized(state: dict[str, Any], index: int, which: int = 0) -> torch.Tensor:
    """``state<index>`` (its slice ``which`` for AdEMAMix's stacked m1, m2) as float32."""
    values = state[f"state{index}"]
    if values.dtype != torch.uint8:
        return values if values.dim() == state["param"].dim() else values[which]
    absmax = state[f"absmax{index}"]
    if values.dim() != state["param"].dim():  # AdEMAMix: (2, *shape) codes, (2, blocks) absmax
        values, absmax = values[which], absmax[which]
    functional = sys.modules["bitsandbytes.functional"]
    return functional.dequantize_blockwise(values, absmax=absmax, code=state[f"qmap{index}"],
                                           blocksize=_BLOCK)


def bnb_adam_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    """m and v, dequantized where 8-bit."""
    return {"exp_avg": _dequantized(view, 1), "exp_avg_sq": _dequantized(view, 2),
            "param": view["param"], "grad": view["grad"]}


def bnb_lion_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    return {"exp_avg": _dequantized(view, 1), "param": view["param"], "grad": view["grad"]}


def bnb_ademamix_state(view: dict[str, Any], param: torch.Tensor, h: dict[str, Any]) -> dict[str, Any]:
    return {"exp_avg": _dequantized(view, 1, 0), "exp_avg_slow": _dequantized(view, 1, 1),
            "exp_avg_sq": _dequantized(view, 2), "param": view["param"], "grad": view["grad"]}


_BNB_ADAM = [f"bitsandbytes.optim.{module}:{prefix}{name}{bits}"
             for module, name in (("adam", "Adam"), ("adamw", "AdamW"))
             for prefix in ("", "Paged") for bits in ("", "8bit", "32bit")]
_BNB_LION = [f"bitsandbytes.optim.lion:{prefix}Lion{bits}" for prefix in ("", "Paged")
             for bits in ("", "8bit", "32bit")]
# (not AdEMAMix32bit / PagedAdEMAMix32bit: in bitsandbytes 0.50.2 they keep one buffer where
# the step reads two, m1 and m2, and their step fails on the CPU; AdEMAMix(optim_bits=32) works)
_BNB_ADEMAMIX = [f"bitsandbytes.optim.ademamix:{name}" for name in (
    "AdEMAMix", "AdEMAMix8bit", "PagedAdEMAMix", "PagedAdEMAMix8bit")]


def register() -> None:
    """Register the models of this module (called once by ``lrscope.torch``)."""
    reg = registry.register
    # bitsandbytes' Adam applies decoupled decay like AdamW
    for path in _BNB_ADAM:
        reg(path, "adamw", scalars=bnb_scalars, state=bnb_adam_state, neutral=("t_alpha", "t_beta3"))
    for path in _BNB_LION:
        reg(path, "lion", scalars=bnb_scalars, state=bnb_lion_state, neutral=("eps",))
    for path in _BNB_ADEMAMIX:
        reg(path, "ademamix", scalars=bnb_scalars, state=bnb_ademamix_state, neutral=("t_beta3",))


__all__ = ["register"]
