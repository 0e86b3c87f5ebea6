"""The lr an optimizer lrscope does not model publishes in its param groups as applied.

The step of such an optimizer may apply another value than the group's ``lr`` key:
schedule-free optimizers warm it up inside ``step()`` and write the result to
``scheduled_lr``; Prodigy and D-Adaptation scale their update by ``d * lr``, ``d`` being
their distance estimate, which the step updates for the next one.  Until lrscope models
them, their report's ``lr`` is that published value, ``GroupReport.lr_source`` names it
and a note says how it was read; their step size and decay rate stay unknown (NaN).
One table (``PUBLISHED``), not a test per package: an optimizer is matched by the keys
its groups hold.

>>> group = {"lr": 1.0, "d": 1e-6}
>>> applied_lr(group, group, 1.0, before_step=True)[:3]
(1e-06, 'd*lr', {'d': 1e-06})
>>> applied_lr({"lr": 0.1}, {"lr": 0.1}, 0.1, before_step=True)
(0.1, 'lr', {}, None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class Published:
    """An applied lr that optimizers publish in their groups."""

    #: ``GroupReport.lr_source``: how the lr is formed from the group's keys.
    source: str
    #: The group keys it needs (an optimizer publishing them all is matched).
    keys: tuple[str, ...]
    #: Whether ``step()`` writes the value it applies (read it after the step) or applies the
    #: value it finds and updates it for the next step (read it before the step).
    written_by_step: bool
    #: The applied lr from the group and the lr key's value at the step.
    value: Callable[[Mapping[str, Any], Any], Any]
    #: The extra scalars it is made of, reported beside it.
    parts: tuple[str, ...]
    #: Who publishes it, for the note.
    who: str


PUBLISHED: tuple[Published, ...] = (
    Published("scheduled_lr", ("scheduled_lr",), True, lambda group, lr: group["scheduled_lr"], (),
              "schedule-free optimizers write the lr their step applied (its warmup included) to "
              "the group's 'scheduled_lr'"),
    Published("d*lr", ("d",), False, lambda group, lr: _number(group["d"]) * _number(lr), ("d",),
              "Prodigy and D-Adaptation scale their step by their distance estimate 'd' times the "
              "group's 'lr' key"),
)


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def applied_lr(before: Mapping[str, Any], after: Mapping[str, Any], lr: Any, *,
               before_step: bool) -> tuple[float, str, dict[str, float], str | None]:
    """``(lr, lr_source, extra scalars, note)`` for a group of an optimizer lrscope does not
    model: ``before``/``after`` are the group as the step found and left it, ``lr`` its lr
    key at the step; ``before_step`` is False when no one recorded the group before the step
    (``inspect``), so a value the step updates is the next step's.  An lr that is not a
    number is NaN (unknown), with a note.
    """
    for entry in PUBLISHED:
        group = after if entry.written_by_step else before
        if not all(key in group for key in entry.keys):
            continue
        note = (f"lr is {entry.source!r}, not the group's 'lr' key: {entry.who}; lrscope does not "
                "model this optimizer, so a further factor of its step (a bias correction) is not in it")
        if not entry.written_by_step and not before_step:
            note += (f"; read after the step, {entry.source!r} is the next step's (lrscope.watch "
                     "records it before the step)")
        try:
            value = _number(entry.value(group, lr))
            extra = {part: _number(group[part]) for part in entry.parts}
        except (TypeError, ValueError, RuntimeError) as error:
            return math.nan, entry.source, {}, (f"{note}; unreadable here ({type(error).__name__}: "
                                                f"{error}): lr unknown (NaN)")
        return value, entry.source, extra, note
    try:
        return _number(lr), "lr", {}, None
    except (TypeError, ValueError, RuntimeError):
        return math.nan, "lr", {}, f"its 'lr' key is {lr!r}, not a number: lr unknown (NaN)"
