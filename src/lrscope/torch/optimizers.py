"""Which torch optimizer this is: its family, its hyperparameters in lrscope's names, its
parameters' names.

``FAMILY_OF`` maps the ``torch.optim`` classes lrscope models to their families (registered
with ``lrscope.register``, like the third-party models of ``models.py``); ``unwrap`` finds
the optimizer inside wrappers; ``hyperparameters`` translates a param group and names the
options lrscope does not model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrscope import formulas, registry
from lrscope.torch import deepspeed, distributed, schedule_free
from lrscope.torch.state import as_float

_OPTIM = torch.optim
#: torch.optim classes lrscope models exactly, with their family.
FAMILY_OF: dict[type, str] = {
    _OPTIM.SGD: "sgd", _OPTIM.Adam: "adam", _OPTIM.AdamW: "adamw", _OPTIM.Adamax: "adamax",
    _OPTIM.NAdam: "nadam", _OPTIM.RAdam: "radam", _OPTIM.Adagrad: "adagrad",
    _OPTIM.RMSprop: "rmsprop", _OPTIM.Adadelta: "adadelta", _OPTIM.Rprop: "rprop",
    _OPTIM.ASGD: "asgd", _OPTIM.SparseAdam: "sparse_adam", _OPTIM.Adafactor: "adafactor",
}
# Registered like any other model (lrscope.register); lrscope.torch.models adds Muon and the
# third-party optimizers the same way.
for _cls, _family in FAMILY_OF.items():
    registry.register(_cls, _family)
#: Group keys that do not change the update's arithmetic (implementation choices,
#: keys schedulers add) and so need no modelling.
_NEUTRAL_KEYS = {
    "params", "name", "foreach", "fused", "capturable", "differentiable", "initial_lr",
    "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "swa_lr", "param_names",
}


def unwrap(optimizer: Any) -> Any:
    """The torch.optim.Optimizer inside wrappers that expose ``.optimizer``: plain wrappers
    (Lightning's ``LightningOptimizer``) and Optimizer subclasses that only delegate to it,
    sharing its param groups and state (accelerate's ``AcceleratedOptimizer``).  An optimizer
    with state of its own around an inner one (Lookahead) is kept: its step is not the inner
    one's.

    >>> inner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> class Wrapper:
    ...     optimizer = inner
    >>> unwrap(Wrapper()) is inner
    True

    ``ZeroRedundancyOptimizer`` gives its local optimizer, which holds this rank's partition
    and whose step runs inside the wrapper's; schedulefree's wrappers their ``base``, whose
    step is their z-step (``lrscope.torch.schedule_free``).
    """
    for _ in range(8):
        optimizer = schedule_free.base_of(distributed.local_optimizer(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            break
        if isinstance(optimizer, torch.optim.Optimizer) and not _delegates(optimizer, inner):
            break
        optimizer = inner
    return optimizer


def _delegates(outer: torch.optim.Optimizer, inner: Any) -> bool:
    """Whether ``outer``'s param groups and state are ``inner``'s own objects."""
    try:
        return outer.param_groups is inner.param_groups and outer.state is inner.state
    except AttributeError:
        return False


def _unset(value: Any) -> bool:
    """Whether an option is off: None, False or zero (a one-element tensor too).  Anything
    else is set, a tensor of several elements included (a schedule's table in a group):
    its truth value is ambiguous.

    >>> _unset(0), _unset(None), _unset(torch.tensor(0.0)), _unset(torch.ones(3)), _unset("x")
    (True, True, True, False, False)
    """
    if value is None or value is False:
        return True
    try:
        return bool(value == 0)
    except (RuntimeError, ValueError, TypeError):
        return False


def family_of(optimizer: torch.optim.Optimizer) -> str | None:
    """The family modelled exactly, or None (unknown class, or a subclass overriding step)."""
    model = registry.model_for(type(optimizer))
    return None if model is None else model.family


def _number_or_nan(value: Any) -> float:
    """``value`` as a float, NaN if it is not a number (the model check then says why)."""
    try:
        return as_float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def group_name(group: dict[str, Any], index: int) -> str:
    """The group's ``name`` key if any, else ``pg<index>`` (Lightning's convention)."""
    return str(group.get("name") or f"pg{index}")


def hyperparameters(family: str, group: dict[str, Any], lr: Any, *, model: registry.Model | None = None,
                    step: registry.GroupStep | None = None) -> tuple[dict[str, Any], list[str]]:
    """Canonical hyperparameters of a group, and the options lrscope does not model.

    A registered model's ``scalars`` hook, given ``step``, overrides what the group's keys
    say (it may raise ``registry.Unknown``); its ``neutral`` keys need no modelling, and the
    family's ``unsupported(h)`` names option values it does not model.
    """
    module = formulas.family(family)
    known = module.DEFAULTS["torch"]
    neutral = _NEUTRAL_KEYS | (model.neutral if model is not None else frozenset())
    given = {k: v for k, v in group.items() if k in known or k == "betas"}
    given["lr"] = lr
    unsupported = [
        f"{k}={v!r}" for k, v in group.items()
        if k not in known and k not in neutral and k != "betas" and not _unset(v)
    ]
    if model is not None and model.scalars is not None and step is not None:
        given.update(model.scalars(step))
    h = formulas.hyperparameters(family, "torch", **given)
    if hasattr(module, "unsupported"):
        unsupported += module.unsupported(h)
    return h, unsupported


def _parameter_names(model: Any, optimizer: Any) -> dict[int, str]:
    """Each parameter's name in ``model`` (the module inside DDP's wrapper, without
    torch.compile's prefix), else ``param<i>`` by its position in ``optimizer``'s groups (the
    wrapper's, where a rank's optimizer holds a partition of them: the same name on every rank)."""
    names: dict[int, str] = {}
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or deepspeed.is_engine(model):
        model = model.module
    if model is not None:
        for name, p in model.named_parameters():
            names[id(p)] = name.replace("_orig_mod.", "")  # torch.compile's wrapper prefix
    index = 0
    groups = optimizer if isinstance(optimizer, list) else [g["params"] for g in optimizer.param_groups]
    for group in groups:
        for p in group:
            names.setdefault(id(p), f"param{index}")
            index += 1
    return names
