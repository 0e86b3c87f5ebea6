"""Which optimizer classes lrscope models exactly, and how: one registry for the built-in
models and for anyone adding an optimizer.

A *model* ties an optimizer class to a family formula (``lrscope.formulas``: the update
rule ``delta_theta = -eta * d - decay_rate * theta``, stated once) and says how to read
what the formula needs from the optimizer at a step::

    import lrscope

    lrscope.register(MyAdam, "adam")                     # an Adam with another class

    lrscope.register(
        "mypackage.optim:Fancy",       # or the class; "module:Qualname" waits for an import
        my_family,                     # a formula: NAMES, DEFAULTS, step_sizes, elementwise
        scalars=lambda step: {"lr": step.after["applied_lr"]},   # per group and step
        state=lambda view, param, h: {**view, "buffer": view["buf"]},  # per tensor
        neutral=("log_every",),        # group keys that do not change the update
        counter="k",                   # the group key holding t after the step
    )

Matching is by class identity along the MRO, never by a type's name: a subclass is
covered unless it overrides ``step()`` (then its update may differ, and lrscope falls
back to the scheduled lr).  A class given as ``"module:Qualname"`` is resolved when that
module has been imported by someone else (lrscope never imports it), then matched by
identity like the others.

The hooks are called by the framework's reader (``lrscope.torch``) with that
framework's objects; this module imports none:

``scalars(step: GroupStep) -> dict``
    canonical hyperparameters read at the step, overriding the group's own keys (the lr
    the step really applied, an adapted ``d``, an averaging weight).  Raise ``Unknown``
    when a value cannot be known (lrscope then reports NaN and says why).
``state(view, param, h) -> dict``
    the formula's inputs of one tensor: ``view`` holds the optimizer state of the tensor
    under its own names, ``param`` (after the step) and ``grad``; return the view the
    formula reads (add, rename or drop entries).
``neutral``
    group keys the family's ``DEFAULTS`` do not name that need no modelling: bookkeeping
    (``k``, a logging interval), or keys the ``scalars`` hook reads itself.  Any other key the family's ``DEFAULTS`` do not name, with a
    value other than None/False/0, makes lrscope report the group as not modelled rather
    than mis-model it.
``counter``
    the group key holding t after the step, for optimizers that count steps per group
    (default: the tensors' ``state["step"]``).
``lr_source``
    how the reported lr is formed where ``scalars`` returns another ``"lr"`` than the
    group's key (``"scheduled_lr"``), reported as ``GroupReport.lr_source``.

``lrscope.testing.check_identity`` runs an optimizer's real steps against its model.

>>> class Fancy:
...     def step(self): ...
>>> class Faster(Fancy):
...     pass
>>> model = register(Fancy, "sgd")
>>> model_for(Faster) is model, model.family
(True, 'sgd')
>>> unregister(Fancy)
>>> model_for(Faster) is None
True
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

from lrscope import formulas


class Unknown(Exception):
    """Raised by a ``scalars`` hook for a value the optimizer's state no longer holds
    (its message says what to do); lrscope reports NaN instead of a guess."""


@dataclass
class GroupStep:
    """What a ``scalars`` hook sees of one parameter group at the step just taken.

    ``after`` is the group now; ``before`` a copy taken as the step began (by ``watch``'s
    pre-step hook; None for ``inspect``, which has no hook); ``lrs`` the lr of every group
    as the step used it; ``t`` the step counter where the reader knows it (else None).
    """

    optimizer: Any
    index: int
    after: dict[str, Any]
    before: dict[str, Any] | None
    lrs: list[Any]
    t: Any = None

    def recorded(self, key: str, why: str = "") -> Any:
        """``before[key]``, or ``Unknown`` when the step's start was not recorded."""
        if self.before is None:
            raise Unknown(f"{key!r} as the step began is not in the state after it: use "
                          f"lrscope.watch(), whose pre-step hook records it{why}")
        return self.before[key]


@dataclass(frozen=True)
class Model:
    """How lrscope models one optimizer class (see the module docstring)."""

    family: str
    scalars: Callable[[GroupStep], dict[str, Any]] | None = None
    state: Callable[[dict[str, Any], Any, dict[str, Any]], dict[str, Any]] | None = None
    neutral: frozenset[str] = field(default_factory=frozenset)
    counter: str | None = None
    lr_source: str = "lr"
    cls: Any = None


_MODELS: dict[Any, Model] = {}
#: "module:Qualname" registrations waiting for their module to be imported.
_LAZY: dict[str, Model] = {}


def register(cls: type | str, family: str | ModuleType | Any, *,
             scalars: Callable[[GroupStep], dict[str, Any]] | None = None,
             state: Callable[[dict[str, Any], Any, dict[str, Any]], dict[str, Any]] | None = None,
             neutral: Iterable[str] = (), counter: str | None = None,
             lr_source: str = "lr") -> Model:
    """Model ``cls`` (a class, or ``"module:Qualname"``) with ``family`` (a name in
    ``lrscope.formulas``, or a family object, registered there under its ``NAMES``).

    Registering a class again replaces its model.  Returns the model.
    """
    if not isinstance(family, str):
        family = formulas.register_family(family)
    else:
        formulas.family(family)  # an unknown name fails here, not at the first step
    model = Model(family=family, scalars=scalars, state=state, neutral=frozenset(neutral),
                  counter=counter, lr_source=lr_source, cls=cls)
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"a class named by a string is 'module:Qualname', got {cls!r}")
        _LAZY[cls] = model
    elif isinstance(cls, type):
        _MODELS[cls] = model
    else:
        raise TypeError(f"register() takes the optimizer's class, got {type(cls).__name__}")
    return model


def unregister(cls: type | str) -> None:
    """Forget the model of ``cls`` (as it was registered)."""
    (_LAZY if isinstance(cls, str) else _MODELS).pop(cls, None)


def _resolve_lazy() -> None:
    """Resolve the "module:Qualname" registrations whose module is imported."""
    for path in [p for p in _LAZY if p.split(":")[0] in sys.modules]:
        module_name, qualname = path.split(":")
        target: Any = sys.modules[module_name]
        for part in qualname.split("."):
            target = getattr(target, part, None)
        model = _LAZY.pop(path)
        if isinstance(target, type):
            _MODELS.setdefault(target, Model(**{**model.__dict__, "cls": target}))


def model_for(cls: type) -> Model | None:
    """The model of ``cls``: the registration of the nearest class on its MRO, unless a
    class between them overrides ``step`` (or ``update_step``: Keras); else None."""
    if _LAZY:
        _resolve_lazy()
    for base in cls.__mro__:
        model = _MODELS.get(base)
        if model is not None:
            same = all(getattr(cls, name, None) is getattr(base, name, None)
                       for name in ("step", "update_step"))
            return model if same else None
    return None


def models() -> dict[Any, Model]:
    """Every registered class (resolved ones by class, waiting ones by name) and its model."""
    if _LAZY:
        _resolve_lazy()
    return {**_MODELS, **_LAZY}


__all__ = ["GroupStep", "Model", "Unknown", "model_for", "models", "register", "unregister"]
