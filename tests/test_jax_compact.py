"""lrscope.jax.compact: the Optax state carries each tensor's nonzero bucket counts only,
exactly (compiled and traced alike), and says so where they do not fit."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lrscope  # noqa: E402
import lrscope.optax  # noqa: E402
from lrscope.jax import compact, kernel  # noqa: E402
from lrscope.stats import LogSketch, mapping  # noqa: E402


def _table(nonzero: list[int], seed: int = 0) -> np.ndarray:
    """Rows of bucket counts with ``nonzero[i]`` nonzero buckets in row i, at random."""
    rng = np.random.default_rng(seed)
    table = np.zeros((len(nonzero), mapping.FLOAT32_BUCKETS), np.int32)
    for row, k in enumerate(nonzero):
        table[row, rng.choice(mapping.FLOAT32_BUCKETS, k, replace=False)] = rng.integers(1, 1 << 20, k)
    return table


@pytest.mark.parametrize("nonzero", [[0], [3, 1024, 1025], [32768, 2000, 5], [32768, 32768]],
                         ids=["empty", "one-past-its-own", "a-full-row", "more-than-the-group-holds"])
def test_compiled_and_traced_compaction_agree_and_expand_exactly(nonzero):
    """The kernel's compaction equals the jnp one field by field; expanded, the rows are the
    table's, or, past the shared store, the buckets that fit, and ``dropped`` counts the others."""
    assert kernel.available()
    table = _table(nonzero)
    compiled = jax.device_get(jax.jit(compact.compact)(jnp.asarray(table)))
    traced = jax.device_get(jax.jit(compact._traced)(jnp.asarray(table)))
    for a, b in zip(compiled, traced):
        np.testing.assert_array_equal(a, b)
    further = sum(max(k - compact.PER_TENSOR, 0) for k in nonzero)
    assert int(compiled.dropped) == max(further - compact.SHARED, 0)
    rows = compact.expand(compiled)
    if not int(compiled.dropped):
        np.testing.assert_array_equal(rows, table)
    else:  # the first buckets in row order are kept, exactly
        kept = rows != 0
        np.testing.assert_array_equal(rows[kept], table[kept])
        assert (table != 0).sum() - kept.sum() == int(compiled.dropped)


def test_a_tensor_wider_than_its_own_room_is_decoded_exactly():
    """Adam with a tiny eps and gradients over many orders of magnitude: eta fills ~2000
    buckets of one tensor, more than PER_TENSOR; the report's bucket counts are numpy's of
    eta, through the group's shared store."""
    params = {"wide": jnp.zeros((200, 300), jnp.float32), "narrow": jnp.zeros((4,), jnp.float32)}
    rng = np.random.default_rng(5)
    tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-3, eps=1e-30, keep_arrays=True)
    state = tx.init(params)
    grads = {"wide": jnp.asarray(10.0 ** rng.uniform(-30, 0, (200, 300)), jnp.float32),
             "narrow": jnp.ones((4,), jnp.float32)}
    _, state = jax.jit(tx.update)(grads, state, params)
    eta = np.asarray(state.arrays["pg0"][1]["eta"])
    want = np.bincount(eta.reshape(-1).view(np.uint32) >> mapping.FLOAT32_SHIFT,
                       minlength=mapping.FLOAT32_BUCKETS)
    assert (want != 0).sum() > compact.PER_TENSOR
    carried = jax.device_get(state.stats["pg0"].buckets)
    assert int(carried.dropped) == 0 and (carried.shared_key >= 0).any()
    np.testing.assert_array_equal(compact.expand(carried)[1], want)
    sketch = lrscope.inspect(state).groups[0].params["wide"].effective_lr.sketch
    assert sketch == LogSketch.from_float32_buckets(want, min=sketch.min, max=sketch.max, sum=sketch.sum,
                                                    sum_squares=sketch.sum_squares)


def test_buckets_the_state_cannot_hold_are_reported(monkeypatch):
    """With room for 2 buckets per tensor and 3 more per group, a report names the missing
    counts in a note and a warning; the tensors' extremes and sums stay exact."""
    monkeypatch.setattr(compact, "PER_TENSOR", 2)
    monkeypatch.setattr(compact, "SHARED", 3)
    params = {"a": jnp.zeros((6,), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
    grads = {"a": jnp.arange(1.0, 7.0), "b": jnp.arange(1.0, 6.0)}
    tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-2, eps=1e-30)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert int(state.stats["pg0"].buckets.dropped) == (6 - 2) + (5 - 2) - 3
    with pytest.warns(RuntimeWarning, match="4 nonzero buckets' counts are missing"):
        report = lrscope.inspect(state)
    assert any("are missing from its distributions" in note for note in report.notes)
    eta = 1e-2 / np.arange(1.0, 7.0)  # Adam's first step: lr / |g|, to float32 rounding
    assert report.groups[0].params["a"].effective_lr.max == pytest.approx(eta.max(), rel=1e-5)


def test_a_group_too_large_for_the_int32_keys_is_refused_with_what_to_do():
    """The shared store keys a bucket as ``tensor * 32768 + bucket`` in int32: a group of more
    than 65,536 tensors would wrap around, so it is refused (before anything is allocated)."""
    assert compact.MAX_TENSORS * mapping.FLOAT32_BUCKETS == 2**31
    with pytest.raises(ValueError, match="per_param=False"):
        compact.empty(compact.MAX_TENSORS + 1)
    assert compact.empty(2).index.shape == (2, compact.PER_TENSOR)
