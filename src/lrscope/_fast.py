"""The switch between compiled and op-by-op statistics, shared by every framework package."""

import os


def fast_statistics() -> bool:
    """Whether statistics may take the compiled or traced paths (``lrscope.torch.fused``, Keras'
    ``backend_jax``/``backend_torch``/``backend_tensorflow``); ``LRSCOPE_FUSED=0`` keeps every
    backend on its eager, op-by-op path (the same statistics, slower).

    >>> fast_statistics() == (os.environ.get("LRSCOPE_FUSED", "1") != "0")
    True
    """
    return os.environ.get("LRSCOPE_FUSED", "1") != "0"
