"""Keras 3 on TensorFlow: the family's formula and the statistics of every variable of a step in one graph.

Op by op, every ``keras.ops`` call of the formula is an eager TensorFlow operation
dispatched from Python.  Here the formula (``formulas/``, Keras convention) and the
statistics (``lrscope.keras.stats``) of every chunk of ``keras_stats.CHUNK_ELEMENTS`` of
every variable are traced into one graph, which takes the optimizer's variables
themselves (read inside the graph: an eager read and reshape of each cost more than its
statistics), merges each variable's chunks and stacks the results for the step's one
transfer.  Chunks run in order, at most ``IN_FLIGHT`` at a time (control dependencies), so
temporary memory stays bounded by a few chunks whatever the model size.  The graph is
traced once per model (shapes and dtypes of the state, family, hyperparameters other
than lr), with t, lr and NAdam's ``mu_product`` as tensors: neither a new step nor a
schedule traces again.  Float32 (and half-precision) variables are reduced in float32,
float64 ones in float64: casting every element to float64 doubled the cost of the
statistics.

Lamb and Adafactor stay op by op (``lrscope.keras.stats``): their formula needs whole tensors in
their own shape.  So does everything when ``LRSCOPE_FUSED=0``.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from lrscope import formulas
from lrscope._fast import fast_statistics
from lrscope.keras import stats as keras_stats
from lrscope.report import Distribution

#: Chunks computed at once: two keep both cores of a small machine busy.
IN_FLIGHT = 2

Hyper = tuple[tuple[str, Any], ...]


def applies(family: str) -> bool:
    """Whether ``family``'s statistics are measured by ``collect``."""
    return formulas.chunkable(family) and fast_statistics()


def statistics_dtype(dtype: str) -> str:
    """The dtype a variable of ``dtype`` is reduced in: float64 stays, the rest in float32.

    >>> statistics_dtype("float64"), statistics_dtype("bfloat16")
    ('float64', 'float32')
    """
    return "float64" if dtype == "float64" else "float32"


def _chunk(family: str, columns: dict[str, Any], t: Any, lr: Any, hyper: Hyper, with_update: bool,
           finite_only: bool) -> tuple[Any, Any]:
    """(bucket counts, packed scalars) of one chunk: ``columns`` holds the state (PyTorch
    names), ``param`` and, when given, ``grad`` as columns, and the per-step scalars;
    t and lr in float64."""
    param = columns["param"]
    dtype = param.dtype
    # Without the gradient the formula still needs the key; eta does not depend on it.
    state = {"grad": ops.zeros_like(param), **columns}
    h = {**dict(hyper), "lr": tf.cast(lr, dtype)}
    el = formulas.family(family).elementwise(ops, state, tf.cast(t, dtype), h, "keras")

    def column(value: Any) -> Any:
        return ops.broadcast_to(ops.cast(value, dtype), ops.shape(param))

    eps = None if el.eps_dominated is None else ops.broadcast_to(el.eps_dominated, ops.shape(param))
    delta = None if el.delta is None else column(el.delta)
    return keras_stats.chunk_statistics(column(el.eta), column(el.direction), el.decay_rate, eps, param,
                                        with_update, statistics_dtype(dtype.name), finite_only, delta)


@functools.lru_cache(maxsize=256)
def _chunk_graph(family: str, inputs: tuple[tuple[str, str, bool], ...], hyper: Hyper, with_update: bool,
                 finite_only: bool) -> Any:
    """``_chunk`` traced once as a concrete function for ``inputs`` (name, dtype, whether a
    column) of any length, called by each chunk of the step's graph: the step's graph is
    traced in a fraction of the time (40 chunks: 1.26 s when each traced its own ops)."""

    def chunk(columns: dict[str, Any], t: Any, lr: Any) -> tuple[Any, Any]:
        return _chunk(family, columns, t, lr, hyper, with_update, finite_only)

    specs = {name: tf.TensorSpec([None, 1] if column else [], dtype) for name, dtype, column in inputs}
    scalar = tf.TensorSpec([], tf.float64)
    return tf.function(chunk, autograph=False).get_concrete_function(specs, scalar, scalar)


@functools.lru_cache(maxsize=32)
def _graph(family: str, hypers: tuple[Hyper, ...], with_update: bool, finite_only: bool,
           chunk_elements: int) -> Any:
    """The graph of a step of variables with hyperparameters ``hypers`` (but lr, each
    variable's), a ``tf.function`` traced again only for new shapes, dtypes or names of
    the state (hyperparameters as Python arguments made each call 2 ms slower); its
    chunks are ``chunk_elements`` long (``keras_stats.CHUNK_ELEMENTS``)."""

    def step(arrays: list[dict[str, Any]], scalars: list[dict[str, Any]], t: Any, lr: Any) -> tuple[Any, Any]:
        """The stacked bucket counts and packed scalars of each variable: ``arrays[i]``
        holds its state arrays (variables or tensors), ``scalars[i]`` its per-step scalars."""
        done: list[tuple[Any, Any]] = []
        per_variable = []
        for state, scalar, hyper in zip(arrays, scalars, hypers):
            flat = {k: tf.reshape(v, [-1, 1]) for k, v in state.items()}
            parts = []
            for span in keras_stats.chunks(flat["param"].shape[0], chunkable=True, limit=chunk_elements):
                # Ops created here wait for the chunk IN_FLIGHT before: bounded temporaries.
                with tf.control_dependencies(list(done[-IN_FLIGHT]) if len(done) >= IN_FLIGHT else []):
                    columns = {**{k: tf.identity(v if span is None else v[span]) for k, v in flat.items()},
                               **scalar}
                    inputs = tuple(sorted((k, v.dtype.name, v.shape.rank != 0) for k, v in columns.items()))
                    done.append(_chunk_graph(family, inputs, hyper, with_update, finite_only)(columns, t, lr))
                parts.append(done[-1])
            per_variable.append(keras_stats.combine(parts))
        return (tf.stack([counts for counts, _ in per_variable]),
                tf.stack([tf.cast(row, tf.float64) for _, row in per_variable]))

    return tf.function(step, autograph=False)


def _graph_input(value: Any) -> Any:
    """A Keras variable as its TensorFlow variable (read inside the graph), else ``value``."""
    return value.value if isinstance(value, keras.Variable) else value


def _measure(family: str, states: list[dict[str, Any]], hypers: list[dict[str, Any]], t: int,
             with_update: bool, indices: list[int], finite_only: bool) -> tuple[Any, Any]:
    """The stacked (bucket counts, packed scalars) of the variables of ``indices``."""
    arrays, scalars, static = [], [], []
    for i in indices:
        dtype = states[i]["param"].dtype
        scalars.append({k: tf.constant(v, dtype) for k, v in states[i].items() if isinstance(v, float)})
        arrays.append({k: _graph_input(v) for k, v in states[i].items()
                       if k not in scalars[-1] and v is not None})
        static.append(tuple(sorted((k, v) for k, v in hypers[i].items() if k != "lr")))
    return _graph(family, tuple(static), with_update, finite_only, keras_stats.CHUNK_ELEMENTS)(
        arrays, scalars, tf.constant(float(t), tf.float64), tf.constant(float(hypers[0]["lr"]), tf.float64))


def collect(family: str, states: list[dict[str, Any]], hypers: list[dict[str, Any]], t: int,
            with_update: bool) -> list[tuple[Distribution, float | None, float]]:
    """``(effective lr Distribution, update norm or None, param norm)`` per variable, like
    ``keras_stats.collect`` (NaN/Inf redone with masking); ``states`` and ``hypers`` as
    ``KerasReader.formula_inputs`` gives them."""
    return keras_stats.collect_stacked(functools.partial(_measure, family, states, hypers, t, with_update),
                                       len(states))
