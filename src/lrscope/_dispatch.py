"""Find the backend for an optimizer without importing any framework.

Like einops' backends, a framework is only considered when its module is already in
``sys.modules``: an object cannot come from a framework that was never imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# (framework module that must already be imported, lrscope backend module)
_BACKENDS = (
    ("torch", "lrscope.backends.torch"),
    ("keras", "lrscope.backends.keras"),
    ("tensorflow", "lrscope.backends.tf1"),
    ("optax", "lrscope.backends.optax"),
)


def backend_for(obj: Any) -> Any:
    """The backend module whose ``accepts(obj)`` is true, or a TypeError saying what is
    supported, and what to do where a backend recognises a near miss (its ``hint(obj)``)."""
    hints = []
    for framework, module_name in _BACKENDS:
        if framework in sys.modules:
            backend = importlib.import_module(module_name)
            if backend.accepts(obj):
                return backend
            hint = getattr(backend, "hint", lambda obj: None)(obj)
            if hint:
                hints.append(hint)
    raise TypeError(
        f"lrscope does not know how to read {type(obj).__module__}.{type(obj).__qualname__}: "
        + (" ".join(hints) if hints else
           "pass a torch.optim.Optimizer, a Keras 3 optimizer, a tf.compat.v1.train optimizer "
           "(with session=) or an optax state from lrscope.optax.monitor")
    )
