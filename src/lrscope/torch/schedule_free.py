"""schedulefree's ``ScheduleFreeWrapper`` and ``ScheduleFreeWrapperReference``, read
through the optimizer they wrap.

Either wraps any torch optimizer ``base`` (checked against schedulefree 1.4's sources).
Its ``step()`` puts z into the parameters, runs ``base.step()`` (the z-step: the base
optimizer's step hooks run there, and its model, or the fallback, gives eta and d of z
exactly), then, per group, with ``lr = group["lr"] * group.get("d", 1)``::

    lr_max = max(lr, lr_max);  weight_sum += step_weight(k + 1, lr_max);  k += 1
    ckp1 = averaging_weight(k, lr_max, weight_sum)     # lrscope.formulas.schedule_free
    x <- lerp(x, z, ckp1);   parameters <- y = lerp(x, z, 1 - momentum)

``weight_decay_at_y`` (an attribute; the reference class's is a group key) subtracts
``lr * weight_decay_at_y * y`` from z before the base step.  ``train()``/``eval()`` move the
parameters between y and x without a step (no hook runs).  The state keeps ``z`` (and the
reference class ``x`` and ``y``): after the step it holds z; inside the base step the
parameters do (``ScheduleFreeWrapper`` swaps x into ``state["z"]`` meanwhile).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from lrscope.formulas.schedule_free import averaging_weight, step_weight
from lrscope.torch.state import as_float

#: The wrappers' attributes lrscope models (``weight_decay_at_y``: ScheduleFreeWrapper's).
_ATTRIBUTES = {"base", "momentum", "weight_lr_power", "r", "train_mode", "weight_decay_at_y"}
#: The keys the wrappers add to the base's param groups and state.
_GROUP_KEYS = ("k", "lr_max", "weight_sum", "weight_decay_at_y")
_STATE_KEYS = ("z", "x", "y")


def _classes() -> dict[type, bool]:
    """The wrapper classes of an imported schedulefree, each with whether it is the
    reference one (which keeps x, y and z in the state)."""
    module = sys.modules.get("schedulefree")
    found = {}
    for name, reference in (("ScheduleFreeWrapper", False), ("ScheduleFreeWrapperReference", True)):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found[cls] = reference
    return found


@dataclass(frozen=True)
class Wrapped:
    """A schedule-free wrapper: what its base optimizer's model reads, and what it adds
    to each group's report (``extra``)."""

    wrapper: Any
    reference: bool

    @classmethod
    def of(cls, obj: Any) -> Wrapped | None:
        """``obj`` as a wrapper, or None: not one, or a subclass overriding what it models.

        >>> Wrapped.of(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
        True
        """
        for wrapper_cls, reference in _classes().items():
            if isinstance(obj, wrapper_cls) and all(
                    getattr(type(obj), method) is getattr(wrapper_cls, method) for method in ("step", "train", "eval")):
                return cls(obj, reference)
        return None

    def unsupported(self) -> list[str]:
        """The wrapper's attributes lrscope does not model (another schedulefree release)."""
        return [f"{type(self.wrapper).__name__}.{k}={v!r}" for k, v in vars(self.wrapper).items()
                if k not in _ATTRIBUTES]

    @staticmethod
    def group(group: dict[str, Any]) -> dict[str, Any]:
        """The group as the base optimizer's model reads it: without the wrapper's keys."""
        return {k: v for k, v in group.items() if k not in _GROUP_KEYS}

    @staticmethod
    def state(state: dict[str, Any]) -> dict[str, Any]:
        """The base optimizer's own state of a tensor: without the wrapper's z, x and y."""
        return {k: v for k, v in state.items() if k not in _STATE_KEYS}

    @staticmethod
    def z(param: torch.Tensor, state: dict[str, Any], stepping: bool) -> torch.Tensor:
        """z after the step: the parameter inside the base step (``stepping``), else the
        state's (the parameters then hold y, or x in eval mode)."""
        return param if stepping else state.get("z", param)

    def scalars(self, group: dict[str, Any], lr: Any, stepping: bool) -> dict[str, float]:
        """``ckp1`` of the step, and where the wrapper decays at y the fraction of y it took
        from z (``weight_decay_rate_at_y = lr * weight_decay_at_y``).  ``group`` is the group
        now: inside the base step (``stepping``) the wrapper has not updated its keys yet,
        and ckp1 is computed from them as it is about to; after it, from what it left."""
        wrapper = self.wrapper
        if self.unsupported():
            ckp1 = math.nan
        elif stepping:
            t = group.get("k", 0) + 1
            lr_max = max(as_float(group["lr"]) * as_float(group.get("d", 1.0)), group.get("lr_max", 0))
            weight_sum = group.get("weight_sum", 0.0) + step_weight(t, lr_max, wrapper.r, wrapper.weight_lr_power)
            ckp1 = averaging_weight(t, lr_max, weight_sum, wrapper.r, wrapper.weight_lr_power)
        else:
            ckp1 = averaging_weight(group.get("k", 0), group.get("lr_max", 0.0), group.get("weight_sum", 0.0),
                                    wrapper.r, wrapper.weight_lr_power)
        out = {"ckp1": float(ckp1)}
        decay = group.get("weight_decay_at_y", 0.0) if self.reference else wrapper.weight_decay_at_y
        if decay:
            out["weight_decay_rate_at_y"] = as_float(lr) * decay
        return out


def base_of(obj: Any) -> Any:
    """The optimizer a schedule-free wrapper wraps, else ``obj``."""
    wrapped = Wrapped.of(obj)
    return obj if wrapped is None else wrapped.wrapper.base
