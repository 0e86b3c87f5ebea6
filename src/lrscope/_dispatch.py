"""Find the backend for an optimizer without importing any framework.

Like einops' backends, a framework is only considered when its module is already in
``sys.modules``: an object cannot come from a framework that was never imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# (framework module that must already be imported, lrscope's package for it)
_BACKENDS = (
    ("torch", "lrscope.torch"),
    ("keras", "lrscope.keras"),
    ("tensorflow", "lrscope.tf1"),
    ("optax", "lrscope.optax"),
)


def backend_for(obj: Any) -> Any:
    """The framework package (``lrscope.torch``, ...) whose ``accepts(obj)`` is true, or a TypeError saying what is
    supported, and what to do where a backend recognises a near miss (its ``hint(obj)``)."""
    hints = []
    for framework, module_name in _BACKENDS:
        if framework in sys.modules:
            reader = importlib.import_module(module_name + ".reader")
            if reader.accepts(obj):
                return importlib.import_module(module_name)
            hint = getattr(reader, "hint", lambda obj: None)(obj)
            if hint:
                hints.append(hint)
    raise TypeError(
        f"lrscope does not know how to read {type(obj).__module__}.{type(obj).__qualname__}: "
        + (" ".join(hints) if hints else
           "pass a torch.optim.Optimizer, a Keras 3 optimizer, a tf.compat.v1.train optimizer "
           "(with session=) or an optax state from lrscope.optax.monitor")
    )
