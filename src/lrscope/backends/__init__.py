"""One module per framework: read optimizer state, compute on the framework's device.

Each backend exposes ``accepts(obj)``, ``inspect(obj, **options)`` and
``watch(obj, **options)``; ``lrscope._dispatch`` picks one without importing any
framework that is not already imported.
"""

import os


def fast_statistics() -> bool:
    """Whether statistics may take the compiled or traced paths (``torch_fused``, Keras'
    ``keras_jax``/``keras_torch``/``keras_tensorflow``); ``LRSCOPE_FUSED=0`` keeps every
    backend on its eager, op-by-op path (the same statistics, slower).

    >>> fast_statistics() == (os.environ.get("LRSCOPE_FUSED", "1") != "0")
    True
    """
    return os.environ.get("LRSCOPE_FUSED", "1") != "0"
