"""Distribution statistics of Keras tensors with ``keras.ops``, on the backend's device.

Per variable: float32 bit buckets of eta (``mapping``) counted with ``bincount``, exact
finite min/max/sum/sum of squares, the eps-dominated count and the update and parameter
squared norms.  Elementwise families are processed in chunks of ``CHUNK_ELEMENTS`` so
temporary memory stays bounded whatever the variable size; ``collect_stacked`` moves the
statistics of every variable of a step in two transfers (two more for the variables
holding NaN/Inf, which are measured again with masking).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from lrscope.formulas import Elementwise
from lrscope.report import Distribution, decode_statistics, needs_masked_redo
from lrscope.stats import mapping

#: Elements processed at once by the elementwise families.
CHUNK_ELEMENTS = 1 << 20
_MASK = mapping.FLOAT32_BUCKETS - 1


def chunks(size: int, chunkable: bool, limit: int | None = None) -> list[slice | None]:
    """Flat slices of at most ``limit`` (default ``CHUNK_ELEMENTS``) covering ``size``
    elements, or ``[None]`` (the whole tensor at once).

    >>> chunks(10, chunkable=False), len(chunks(3 * CHUNK_ELEMENTS + 1, chunkable=True))
    ([None], 4)
    """
    limit = limit or CHUNK_ELEMENTS
    if not chunkable or size <= limit:
        return [None]
    return [slice(start, min(start + limit, size)) for start in range(0, size, limit)]


def _squares(x: Any, dtype: str) -> Any:
    x = ops.cast(ops.reshape(x, [-1]), dtype)
    return ops.sum(x * x)


def _extremes(values: Any, finite_only: bool) -> list[Any]:
    """min, max, sum and sum of squares.  The fast path reduces everything (a NaN/Inf then
    shows in the sum and ``collect`` redoes that variable); masking costs as much again."""
    if not finite_only:
        return [ops.min(values), ops.max(values), ops.sum(values), ops.sum(values * values)]
    finite = ops.isfinite(values)
    zero = ops.zeros_like(values)
    return [
        ops.min(ops.where(finite, values, zero + math.inf)),
        ops.max(ops.where(finite, values, zero - math.inf)),
        ops.sum(ops.where(finite, values, zero)),
        ops.sum(ops.where(finite, values * values, zero)),
    ]


def _bucket_counts(keys: Any) -> Any:
    """How many of ``keys`` fall in each of the ``FLOAT32_BUCKETS`` buckets.  On TensorFlow
    a ``DenseBincount`` of that fixed size: ``keras.ops.bincount`` (``tf.math.bincount``)
    first reduces the keys' maximum for its output size, one more pass over the chunk."""
    if keras.backend.backend() != "tensorflow":
        return ops.bincount(keys, minlength=mapping.FLOAT32_BUCKETS)
    import tensorflow as tf

    return tf.raw_ops.DenseBincount(input=keys, size=mapping.FLOAT32_BUCKETS, weights=tf.zeros([0], tf.int32))


def chunk_statistics(eta: Any, direction: Any, decay_rate: Any, eps_dominated: Any, param: Any,
                      with_update: bool, dtype: str, finite_only: bool, delta: Any = None) -> tuple[Any, Any]:
    """(bucket counts, packed scalars) of eta over ``param`` (a tensor or a flat chunk),
    from the parts of its Elementwise (``delta``: the parameters' own change, where eta
    and d describe another sequence)."""
    # A single eta (a number, broadcast) enters the update in the direction's dtype, as
    # a number does op by op.
    same = eta if eta.dtype == direction.dtype else ops.cast(eta, direction.dtype)
    el = Elementwise(same, direction, decay_rate, eps_dominated, delta)
    bits = ops.view(ops.cast(eta, "float32"), "int32")
    counts = _bucket_counts(ops.reshape(ops.bitwise_and(ops.right_shift(bits, mapping.FLOAT32_SHIFT), _MASK), [-1]))
    values = ops.cast(eta, dtype)
    absent = ops.convert_to_tensor(-1.0, dtype=dtype)
    eps = absent if eps_dominated is None else ops.sum(ops.cast(eps_dominated, dtype))
    scalars = ops.stack(
        [
            *_extremes(values, finite_only),
            eps,
            _squares(el.update(param), dtype) if with_update else absent,
            _squares(param, dtype),
        ]
    )
    return counts, scalars


def _named_statistics(inputs: dict[str, Any], with_update: bool, dtype: str,
                      finite_only: bool) -> tuple[Any, Any]:
    """``chunk_statistics`` of the columns and scalars of ``_statistics``."""
    return chunk_statistics(inputs["eta"], inputs["direction"], inputs.get("decay_rate", 0),
                            inputs.get("eps_dominated"), inputs["param"], with_update, dtype,
                            finite_only, inputs.get("delta"))


@functools.cache
def _graph(dtypes: tuple[tuple[str, str], ...], with_update: bool, dtype: str,
           finite_only: bool) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """``_named_statistics`` traced once as a TensorFlow graph for the inputs named in
    ``dtypes`` (with their dtypes), as a concrete function whose columns have any length:
    a call looks up no trace.  (A 250K-element chunk took 5.2 ms op by op; a
    ``tf.function`` matching its arguments on every call, 1.9 ms.)"""
    import tensorflow as tf

    def statistics(inputs: dict[str, Any]) -> tuple[Any, Any]:
        return _named_statistics(inputs, with_update, dtype, finite_only)

    specs = {name: tf.TensorSpec([] if name == "decay_rate" else [None, 1], kind) for name, kind in dtypes}
    return tf.function(statistics, autograph=False).get_concrete_function(specs)


def _column(value: Any, param: Any) -> Any:
    """``value`` (a number or an array) broadcast to ``param``'s shape, as one column: the
    statistics do not depend on shapes, a graph is traced again for every rank, and
    ``ops.view`` in a graph needs a static last dimension."""
    # A Python number (Muon's eta of a matrix) in the parameter's dtype: converted alone it
    # would be float32, rounded before the statistics see it.
    value = ops.convert_to_tensor(value, dtype=param.dtype if isinstance(value, float) else None)
    if tuple(value.shape) != tuple(param.shape):
        value = ops.broadcast_to(value, ops.shape(param))
    return ops.reshape(value, [-1, 1])


def _statistics(el: Elementwise, param: Any, with_update: bool, dtype: str,
                finite_only: bool) -> tuple[Any, Any]:
    """``chunk_statistics`` of ``el`` over ``param``: one graph on the TensorFlow backend
    (``_graph``), op by op on the others.  A nonzero decay rate enters as a tensor (a
    literal zero, which ``update`` skips, is left out), so that a new value traces
    nothing."""
    inputs = {"eta": _column(el.eta, param), "direction": _column(el.direction, param),
              "param": ops.reshape(param, [-1, 1])}
    if not (isinstance(el.decay_rate, (int, float)) and el.decay_rate == 0):
        inputs["decay_rate"] = ops.convert_to_tensor(el.decay_rate, dtype=param.dtype)
    if el.eps_dominated is not None:
        inputs["eps_dominated"] = _column(el.eps_dominated, param)
    if el.delta is not None:
        inputs["delta"] = _column(el.delta, param)
    if keras.backend.backend() != "tensorflow":
        return _named_statistics(inputs, with_update, dtype, finite_only)
    dtypes = tuple(sorted((name, value.dtype.name) for name, value in inputs.items()))
    return _graph(dtypes, with_update, dtype, finite_only)(inputs)


def reduce(
    compute: Callable[[slice | None], Elementwise],
    param: Any,
    with_update: bool,
    dtype: str,
    chunkable: bool,
    finite_only: bool = False,
) -> tuple[Any, Any]:
    """Statistics of eta over ``param``; ``compute(chunk)`` gives the Elementwise of a flat
    slice of every state tensor (``None``: the whole tensors)."""
    spans = chunks(int(np.prod(param.shape)), chunkable)
    if spans == [None]:  # the whole tensor at once: its row is the total
        return _statistics(compute(None), param, with_update, dtype, finite_only)
    flat = ops.reshape(param, [-1])
    return combine([_statistics(compute(chunk), flat[chunk], with_update, dtype, finite_only)
                    for chunk in spans])


def realized(param: Any, before: Any, dtype: str, finite_only: bool = False) -> tuple[Any, Any]:
    """Statistics of |delta theta| over ``param`` (empirical mode), from its copy ``before``
    the step, in ``reduce``'s format: the update is ``-|delta| * -sign(delta) = delta``
    exactly, so the update norm is ||delta theta||; no eps term."""
    flat_after, flat_before = ops.reshape(param, [-1]), ops.reshape(before, [-1])

    def compute(chunk: slice | None) -> Elementwise:
        delta = param - before if chunk is None else flat_after[chunk] - flat_before[chunk]
        return Elementwise(ops.abs(delta), -ops.sign(delta))

    return reduce(compute, param, True, dtype, True, finite_only)


def combine(parts: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """The (bucket counts, packed scalars) of a variable from those of its chunks."""
    if len(parts) == 1:
        return parts[0]
    counts = parts[0][0]
    for c, _ in parts[1:]:
        counts = counts + c
    stacked = ops.stack([row for _, row in parts])
    # Absent terms are -1 in every row: their sum stays negative, still read as absent.
    scalars = ops.concatenate(
        [
            ops.min(stacked[:, :1], axis=0),
            ops.max(stacked[:, 1:2], axis=0),
            ops.sum(stacked[:, 2:], axis=0),
        ]
    )
    return counts, scalars


def to_host(counts: Any, scalars: Any) -> list[tuple[Distribution, float | None, float]]:
    """``(effective lr Distribution, update norm or None, param norm)`` per row of the
    stacked bucket ``counts`` and packed ``scalars`` (moved to the host once each)."""
    counts = ops.convert_to_numpy(counts).astype(np.int64)
    scalars = ops.convert_to_numpy(scalars).astype(np.float64)
    return [decode_statistics(row_counts, row) for row_counts, row in zip(counts, scalars)]


def collect_stacked(measure: Callable[[list[int], bool], tuple[Any, Any]],
                    n: int) -> list[tuple[Distribution, float | None, float]]:
    """The statistics of ``n`` variables from ``measure(indices, finite_only)``, their
    stacked (bucket counts, packed scalars): all of them on the fast path, then those that
    turn out to hold NaN/Inf again with masking."""
    if not n:
        return []
    out = to_host(*measure(list(range(n)), False))
    redo = [i for i, (dist, _, _) in enumerate(out) if needs_masked_redo(dist)]
    if redo:
        for i, masked in zip(redo, to_host(*measure(redo, True))):
            out[i] = masked
    return out


def collect(measures: list[Callable[[bool], tuple[Any, Any]]]) -> list[tuple[Distribution, float | None, float]]:
    """Every ``measure(finite_only)`` (a ``reduce``), moved to the host together, as
    ``collect_stacked``."""

    def stacked(indices: list[int], finite_only: bool) -> tuple[Any, Any]:
        stats = [measures[i](finite_only) for i in indices]
        return ops.stack([c for c, _ in stats]), ops.stack([s for _, s in stats])

    return collect_stacked(stacked, len(measures))
