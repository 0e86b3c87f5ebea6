"""A group's bucket counts as the Optax state carries them: the nonzero buckets only.

A tensor's full row of float32 bucket counts is 32768 int32 (128 KiB), but eta of a real
optimizer fills a few hundred of them.  The state carries every array of the statistics
from one step to the next, and a training step that does not donate its state copies
them all into new buffers on every step, distributions or not; so the state keeps, per
tensor, its first ``PER_TENSOR`` nonzero buckets (index and count, in bucket order), and
for the whole group a shared store of ``SHARED`` more (``tensor * FLOAT32_BUCKETS +
bucket`` and count) for the tensors that have more nonzero buckets than that (a wide
eta, or measured-only |delta theta|).  Every count is exact while the group's tensors
have together at most ``SHARED`` nonzero buckets beyond their first ``PER_TENSOR`` each;
beyond that the state records how many buckets it could not keep (``Counts.dropped``,
a note of the report: ``lrscope.optax.reader``).

``compact`` takes the full rows (``lrscope.jax.kernel`` on a single CPU device, where
XLA's scatter is slow; a cumulative sum and a scatter elsewhere), ``compiled_carried`` the
first ``KEPT`` nonzero buckets that each tensor's compiled pass kept (``lrscope.jax.fused``:
no full rows; a tensor's buckets beyond those are counted in ``dropped`` too), ``expand``
rebuilds them from the state's host copy.

>>> table = np.zeros((2, mapping.FLOAT32_BUCKETS), np.int32)
>>> table[0, [7, 9]], table[1, 3] = [2, 5], 1
>>> carried = compact(jnp.asarray(table))
>>> carried.index.shape, carried.index[0, :3].tolist(), carried.count[0, :3].tolist()
((2, 1024), [7, 9, -1], [2, 5, 0])
>>> np.array_equal(expand(jax.device_get(carried)), table)
True
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrscope.jax import fused, kernel
from lrscope.jax.stats import LeafStats, by_blocks, empty_stats, stack_stats
from lrscope.stats import mapping

#: Nonzero buckets the state keeps per tensor (a real optimizer's eta: a few hundred).
PER_TENSOR = 1024
#: Nonzero buckets the state keeps per group beyond its tensors' first ``PER_TENSOR``:
#: one more tensor's full row.
SHARED = mapping.FLOAT32_BUCKETS
#: Nonzero buckets a tensor's compiled pass keeps (``compiled_carried``): its own, and as
#: many more for the shared store (Adam's eta over 11M parameters: at most 1,122; 2,048
#: buckets span 32 octaves of eta, a factor of 4e9).
KEPT = 2 * PER_TENSOR


class Counts(NamedTuple):
    """The bucket counts of a group's ``n`` tensors as the state carries them (``-1`` and 0
    where unused)."""

    index: jax.Array  # int32[n, PER_TENSOR]: each tensor's first nonzero buckets
    count: jax.Array  # int32[n, PER_TENSOR]: their counts
    shared_key: jax.Array  # int32[SHARED]: tensor * FLOAT32_BUCKETS + bucket of the further ones
    shared_count: jax.Array  # int32[SHARED]: their counts
    dropped: jax.Array  # int32: nonzero buckets kept nowhere (0: every count is exact)


def carried(stats: LeafStats) -> LeafStats:
    """Stacked statistics as the state carries them: their ``buckets`` a ``Counts``."""
    return stats._replace(buckets=compact(stats.buckets))


def compiled_carried(compiled: list[Callable[[int | None], LeafStats]],
                     traced: list[Callable[[], LeafStats]], sizes: list[int]) -> LeafStats:
    """``carried(stats.compiled_or_blocks(...))`` without a full row of counts per tensor:
    each tensor's compiled pass (``compiled[i](keep)``, a ``stats.compiled_leaf_stats``)
    keeps its first ``KEPT`` nonzero buckets itself, and those beyond its first
    ``PER_TENSOR`` go to the shared store, so XLA never allocates, writes, stacks and
    compacts 128 KiB per tensor (on an Adam step over 11M parameters, the difference
    between 1.5 and 2.3 plain steps).  A tensor's nonzero buckets beyond ``KEPT`` are
    counted in ``dropped``, not kept: a path with full rows for them, under a conditional,
    would cost every step, also between distributions (XLA:CPU pays for the branches it
    does not take), for eta spread over more than 32 octaves.  Where a formula does not
    compile, ``compact`` of ``by_blocks(traced, sizes)``."""
    try:
        kept = stack_stats([measure(KEPT) for measure in compiled])
    except fused.Unsupported:
        return carried(by_blocks(traced, sizes))
    return kept._replace(buckets=_from_kept(*kept.buckets))


def carried_empty(n: int) -> LeafStats:
    """``carried`` placeholder statistics of ``n`` tensors (the state before any step)."""
    return empty_stats(n)._replace(buckets=empty(n))


def uncarried(host: LeafStats) -> LeafStats:
    """The host copy of ``carried`` statistics with their full rows of counts again."""
    return host._replace(buckets=expand(host.buckets))


#: Tensors per group the shared store's int32 keys (``tensor * FLOAT32_BUCKETS + bucket``) can name.
MAX_TENSORS = 2**31 // mapping.FLOAT32_BUCKETS


def _check(n: int) -> None:
    if n > MAX_TENSORS:
        raise ValueError(f"lrscope: a group of {n:,} tensors, more than the {MAX_TENSORS:,} whose bucket "
                         "counts the state can key per tensor; pass per_param=False to "
                         "lrscope.optax.monitor (group distributions only), or split the group")


def empty(n: int) -> Counts:
    """The counts of ``n`` tensors before any step (none)."""
    _check(n)
    return Counts(jnp.full((n, PER_TENSOR), -1, jnp.int32), jnp.zeros((n, PER_TENSOR), jnp.int32),
                  jnp.full((SHARED,), -1, jnp.int32), jnp.zeros((SHARED,), jnp.int32),
                  jnp.zeros((), jnp.int32))


def compact(table: jax.Array) -> Counts:
    """The carried form of ``table``, int32[n, FLOAT32_BUCKETS] (a row per tensor)."""
    _check(table.shape[0])
    if kernel.available():
        return jax.lax.platform_dependent(
            cpu=lambda: Counts(*kernel.compact(table, PER_TENSOR, SHARED)), default=lambda: _traced(table))
    return _traced(table)


def _traced(table: jax.Array) -> Counts:
    """``compact`` with XLA's operations: each nonzero bucket's rank in its row (a
    cumulative sum), scattered to its slot, or to the shared store past ``PER_TENSOR``."""
    n, width = table.shape
    nonzero = table != 0
    rank = jnp.cumsum(nonzero, axis=1, dtype=jnp.int32) - 1
    own = nonzero & (rank < PER_TENSOR)
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    buckets = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), table.shape)
    slot = jnp.where(own, rank, PER_TENSOR)  # column PER_TENSOR: the ones not kept here
    index = jnp.full((n, PER_TENSOR + 1), -1, jnp.int32).at[rows, slot].set(buckets)[:, :PER_TENSOR]
    count = jnp.zeros((n, PER_TENSOR + 1), jnp.int32).at[rows, slot].set(table)[:, :PER_TENSOR]
    return Counts(index, count, *_shared(nonzero & ~own, rows * width + buckets, table))


def _shared(further: jax.Array, keys: jax.Array, counts: jax.Array) -> tuple[jax.Array, ...]:
    """The shared store of the nonzero buckets beyond the tensors' own (``further``, in
    tensor order), with their ``keys`` and ``counts``: the first ``SHARED`` of them, and
    the number left out."""
    further = further.reshape(-1)
    position = jnp.cumsum(further, dtype=jnp.int32) - 1
    place = jnp.where(further & (position < SHARED), position, SHARED)
    shared_key = jnp.full((SHARED + 1,), -1, jnp.int32).at[place].set(keys.reshape(-1))[:SHARED]
    shared_count = jnp.zeros((SHARED + 1,), jnp.int32).at[place].set(counts.reshape(-1))[:SHARED]
    return shared_key, shared_count, jnp.maximum(further.sum(dtype=jnp.int32) - SHARED, 0)


def _from_kept(index: jax.Array, count: jax.Array, more: jax.Array) -> Counts:
    """``compact`` of rows given by their first nonzero buckets (``index`` and ``count``,
    int32[n, KEPT], in bucket order, -1 and 0 past the last) and the number of nonzero
    buckets beyond them (``more``, int32[n], counted as dropped)."""
    rows = jnp.arange(index.shape[0], dtype=jnp.int32)[:, None]
    rest, rest_count = index[:, PER_TENSOR:], count[:, PER_TENSOR:]
    shared_key, shared_count, dropped = _shared(rest >= 0, rows * mapping.FLOAT32_BUCKETS + rest, rest_count)
    return Counts(index[:, :PER_TENSOR], count[:, :PER_TENSOR], shared_key, shared_count,
                  dropped + more.sum(dtype=jnp.int32))


def expand(counts: Counts) -> np.ndarray:
    """The full rows, int64[n, FLOAT32_BUCKETS], from the host copy of a ``Counts``."""
    index, count = np.asarray(counts.index), np.asarray(counts.count)
    table = np.zeros((len(index), mapping.FLOAT32_BUCKETS), np.int64)
    rows, columns = np.nonzero(index >= 0)
    table[rows, index[rows, columns]] = count[rows, columns]
    key = np.asarray(counts.shared_key)
    used = key >= 0
    table.reshape(-1)[key[used]] = np.asarray(counts.shared_count)[used]
    return table
