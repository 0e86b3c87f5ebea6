"""Import optional dependencies lazily, with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling the user ``pip install 'lrscope[extra]'``.

    >>> require("json", "core").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is needed for this part of lrscope: pip install 'lrscope[{extra}]'"
        ) from error
