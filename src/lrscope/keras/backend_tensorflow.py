"""Keras 3 on TensorFlow: the family's formula and the statistics of a chunk in one graph.

Op by op, every ``keras.ops`` call of the formula is an eager TensorFlow operation
dispatched from Python, beside one ``tf.function`` graph for the statistics
(``lrscope.keras.stats``).  Here the formula (``formulas/``, Keras convention) is traced into that
graph too, one call per chunk of ``keras_stats.CHUNK_ELEMENTS``.  The graph is traced
once per family, hyperparameters other than lr, and names and dtypes of the state, as a
concrete function whose columns have any length, with t, lr and NAdam's ``mu_product``
as tensors: neither a new step, a schedule nor a new size traces again, and a call looks
up no trace.  40 variables of 250K took 62 ms instead of 132-134 ms op by op (one-off).

Lamb and Adafactor stay op by op (``lrscope.keras.stats``): their formula needs whole tensors in
their own shape.  So does everything when ``LRSCOPE_FUSED=0``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
from keras import ops

from lrscope import formulas
from lrscope._fast import fast_statistics
from lrscope.keras import stats as keras_stats
from lrscope.report import Distribution

#: TensorFlow has float64: the statistics are reduced in it.
_STATISTICS_DTYPE = "float64"


def applies(family: str) -> bool:
    """Whether ``family``'s statistics are measured by ``collect``."""
    return formulas.chunkable(family) and fast_statistics()


def _chunk(family: str, columns: dict[str, Any], t: Any, lr: Any,
           hyper: tuple[tuple[str, Any], ...], with_update: bool, finite_only: bool) -> tuple[Any, Any]:
    """(bucket counts, packed scalars) of one chunk: ``columns`` holds the state (PyTorch
    names), ``param`` and, when given, ``grad`` as columns."""
    param = columns["param"]
    # Without the gradient the formula still needs the key; eta does not depend on it.
    state = {"grad": ops.zeros_like(param), **columns}
    el = formulas.family(family).elementwise(ops, state, t, {**dict(hyper), "lr": lr}, "keras")

    def column(value: Any) -> Any:
        return ops.broadcast_to(ops.cast(value, param.dtype), ops.shape(param))

    eps = None if el.eps_dominated is None else ops.broadcast_to(el.eps_dominated, ops.shape(param))
    delta = None if el.delta is None else column(el.delta)
    return keras_stats.chunk_statistics(column(el.eta), column(el.direction), el.decay_rate, eps, param,
                                        with_update, _STATISTICS_DTYPE, finite_only, delta)


@functools.cache
def _graph(family: str, inputs: tuple[tuple[str, str, bool], ...], hyper: tuple[tuple[str, Any], ...],
           with_update: bool, finite_only: bool) -> Callable[..., tuple[Any, Any]]:
    """``_chunk`` traced once as a graph for ``inputs`` (name, dtype, whether a column)
    of any length: calling it looks up no trace (a ``tf.function`` matching its arguments
    took 1.5 ms a call)."""
    import tensorflow as tf

    def chunk(columns: dict[str, Any], t: Any, lr: Any) -> tuple[Any, Any]:
        return _chunk(family, columns, t, lr, hyper, with_update, finite_only)

    specs = {name: tf.TensorSpec([None, 1] if column else [], dtype) for name, dtype, column in inputs}
    scalar = tf.TensorSpec([], specs["param"].dtype)  # t and lr, in the variable's dtype
    return tf.function(chunk, autograph=False).get_concrete_function(specs, scalar, scalar)


def _reduce(family: str, state: dict[str, Any], hyper: dict[str, Any], t: int, with_update: bool,
            finite_only: bool = False) -> tuple[Any, Any]:
    """(bucket counts, packed scalars) of one variable, chunk by chunk."""
    dtype = state["param"].dtype
    scalars = {k: ops.convert_to_tensor(v, dtype=dtype) for k, v in state.items() if isinstance(v, float)}
    arrays = {k: ops.reshape(v, [-1, 1]) for k, v in state.items() if k not in scalars and v is not None}
    inputs = tuple(sorted((k, v.dtype.name, k in arrays) for k, v in {**arrays, **scalars}.items()))
    static = tuple(sorted((k, v) for k, v in hyper.items() if k != "lr"))
    graph = _graph(family, inputs, static, with_update, finite_only)
    t_in, lr = ops.convert_to_tensor(float(t), dtype=dtype), ops.convert_to_tensor(hyper["lr"], dtype=dtype)
    size = int(np.prod(state["param"].shape))
    parts = []
    for chunk in keras_stats.chunks(size, chunkable=True):
        columns = arrays if chunk is None else {k: v[chunk] for k, v in arrays.items()}
        parts.append(graph({**columns, **scalars}, t_in, lr))
    return keras_stats.combine(parts)


def collect(family: str, states: list[dict[str, Any]], hypers: list[dict[str, Any]], t: int,
            with_update: bool) -> list[tuple[Distribution, float | None, float]]:
    """``(effective lr Distribution, update norm or None, param norm)`` per variable, like
    ``keras_stats.collect`` (NaN/Inf redone with masking); ``states`` and ``hypers`` as
    ``KerasReader.formula_inputs`` gives them."""
    return keras_stats.collect([functools.partial(_reduce, family, s, h, t, with_update)
                                for s, h in zip(states, hypers)])
