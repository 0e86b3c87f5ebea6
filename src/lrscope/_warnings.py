"""Warnings attributed to the user's line, not to lrscope's."""

from __future__ import annotations

import sys
import warnings
from types import FrameType


def warn(message: str) -> None:
    """``warnings.warn(message, RuntimeWarning)``, attributed to the innermost caller outside
    lrscope (the user's ``lrscope.watch(...)``, ``tx.init(...)`` or ``optimizer.step()``
    line, or torch's hook runner), however deep inside lrscope the warning arises, so that
    the location shown and ``warnings.filterwarnings(module=...)`` refer to the user's code.
    In lrscope's own sink thread, where no caller is outside lrscope, the thread's entry.
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _inside_lrscope(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level + 1)


def _inside_lrscope(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == "lrscope" or name.startswith("lrscope.")
