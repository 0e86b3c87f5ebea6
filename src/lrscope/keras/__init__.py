"""Keras 3: ``EffectiveLRCallback`` for ``model.fit``, ``inspect``/``watch`` for custom loops.

Works on the tensorflow, jax and torch Keras backends.

>>> import numpy as np, keras, lrscope, lrscope.keras
>>> w = keras.Variable(np.array([1.0, -2.0, 3.0]))
>>> optimizer = keras.optimizers.Adam(1e-3)
>>> optimizer.apply([keras.ops.convert_to_tensor(np.array([0.1, 0.2, -0.3]))], [w])
>>> report = lrscope.inspect(optimizer)
>>> report.t, round(report.groups[0].step_size, 7)
(1, 0.0003162)
"""

from __future__ import annotations

from lrscope._optional import require

require("keras", "keras")

from lrscope.keras.monitor import (  # noqa: E402
    EffectiveLRCallback, KerasMonitor, elementwise, inspect, watch,
)

__all__ = ["EffectiveLRCallback", "KerasMonitor", "elementwise", "inspect", "watch"]
