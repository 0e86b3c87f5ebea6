"""Warnings attributed to the user's line, not to lrscope's or a framework's."""

from __future__ import annotations

import sys
import warnings
from types import FrameType

#: Packages passed over to find the user's line: lrscope, and the frameworks whose hooks,
#: callbacks and loops call lrscope (``optimizer.step()`` runs lrscope's hook inside torch).
_PASSED_OVER = ("lrscope", "torch", "keras", "tensorflow", "jax", "optax", "flax")


def warn(message: str) -> None:
    """``warnings.warn(message, RuntimeWarning)``, attributed to the innermost caller outside
    lrscope and the frameworks (the user's ``lrscope.watch(...)``, ``optimizer.step()`` or
    ``model.fit(...)`` line), however deep the warning arises, so that the location shown
    and ``warnings.filterwarnings(module=...)`` refer to the user's code.  In lrscope's own
    sink thread, where no caller is the user's, the thread's entry.
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _passed_over(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level + 1)


def _passed_over(frame: FrameType) -> bool:
    package = frame.f_globals.get("__name__", "").partition(".")[0]
    return package in _PASSED_OVER
