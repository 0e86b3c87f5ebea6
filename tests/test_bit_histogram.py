"""The CPU bit-bucket counter against numpy's bincount of the same keys."""

from __future__ import annotations

import numpy as np
import pytest

from lrscope.stats import bit_histogram, mapping


def keys_of(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32).view(np.uint32) >> mapping.FLOAT32_SHIFT


def mixed(n: int, seed: int) -> np.ndarray:
    """Twelve decades of both signs, with zeros, NaN, infinities and float32 subnormals."""
    rng = np.random.default_rng(seed)
    values = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-8, 4, n)
    specials = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40]
    values[rng.integers(0, n, 50)] = rng.choice(specials, 50)
    return values.astype(np.float32)


@pytest.mark.parametrize("mode", ["numba", "numpy"])
def test_counts_equal_bincount(mode):
    if mode == "numba" and bit_histogram._compiled_counter() is None:
        pytest.skip("numba is not installed (pip install 'lrscope[torch]')")
    counts = bit_histogram.BucketCounts()
    if mode == "numpy":
        counts._count = None
    arrays = [mixed(n, seed) for seed, n in enumerate([10_000, 7, 5000, 1, 100_003])]
    for values in arrays:
        counts.add(values)
    counts.add(np.array([2.5], np.float32), weight=1000)
    expected = np.bincount(np.concatenate([keys_of(a) for a in arrays]), minlength=mapping.FLOAT32_BUCKETS)
    expected[keys_of(np.array([2.5]))] += 1000
    indices, got = counts.nonzero()
    assert indices.tolist() == np.flatnonzero(expected).tolist()
    assert got.tolist() == expected[indices].tolist()


def test_int32_counts_are_folded_before_they_overflow(monkeypatch):
    if bit_histogram._compiled_counter() is None:
        pytest.skip("numba is not installed (pip install 'lrscope[torch]')")
    monkeypatch.setattr(bit_histogram, "_ROW_LIMIT", 10_000)
    counts = bit_histogram.BucketCounts()
    values = np.full(6000, 3.0, np.float32)
    for _ in range(5):
        counts.add(values)
    indices, got = counts.nonzero()
    assert got.tolist() == [30_000] and indices.tolist() == keys_of(values[:1]).tolist()
    assert counts._total is not None  # folded at least once


@pytest.mark.parametrize("row_limit", [bit_histogram._ROW_LIMIT, 10_000])
def test_scan_within_the_extremes_equals_the_full_scan(monkeypatch, row_limit):
    """``nonzero(within=(min, max))`` scans only the buckets between the extremes (float64
    bounds of float32-counted values, as the torch backend passes them), before and after
    the int32 counts are folded, and with weighted small adds beside."""
    monkeypatch.setattr(bit_histogram, "_ROW_LIMIT", row_limit)
    rng = np.random.default_rng(7)
    values = [10.0 ** rng.uniform(-9, -2, n) for n in (6000, 5000, 20)]
    counts = bit_histogram.BucketCounts()
    for v in values:
        counts.add(v.astype(np.float32))
    counts.add(np.array([1e-5], np.float32), weight=300)
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    within_indices, within_counts = counts.nonzero((low, high))
    full_indices, full_counts = counts.nonzero()
    assert within_indices.tolist() == full_indices.tolist()
    assert within_counts.tolist() == full_counts.tolist() and within_counts.sum() == 11_320
