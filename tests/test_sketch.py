"""The log-bucket sketch against numpy's exact statistics, on hard data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lrscope.stats import LogSketch, mapping

QS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)

positive_floats = st.floats(min_value=5e-324, max_value=1e300, allow_nan=False, allow_infinity=False)


@st.composite
def hard_positive_data(draw):
    kind = draw(st.sampled_from(["any", "constant", "decades", "subnormal", "one"]))
    n = draw(st.integers(1, 400))
    if kind == "constant":
        return np.full(n, draw(positive_floats))
    if kind == "one":
        return np.array([draw(positive_floats)])
    if kind == "decades":  # 12 decades of range
        exps = draw(hnp.arrays(np.float64, n, elements=st.floats(-6, 6)))
        return 10.0**exps
    if kind == "subnormal":
        return draw(hnp.arrays(np.float64, n, elements=st.floats(5e-324, 2.2e-308)))
    return draw(hnp.arrays(np.float64, n, elements=positive_floats))


def assert_quantiles_close(sketch: LogSketch, finite: np.ndarray) -> None:
    for q in QS:
        exact = np.quantile(finite, q)
        # 1e-323: interpolating between subnormals rounds to the float64 grid.
        assert abs(sketch.quantile(q) - exact) <= 0.01 * abs(exact) + 1e-323, (q, sketch.quantile(q), exact)


@settings(max_examples=300, deadline=None)
@given(hard_positive_data())
def test_quantiles_within_one_percent_and_exact_summaries(data):
    sketch = LogSketch.from_array(data)
    assert sketch.count == data.size
    assert sketch.min == data.min() and sketch.max == data.max()
    assert sketch.mean == pytest.approx(data.mean(), rel=1e-9)
    assert_quantiles_close(sketch, data)


@settings(max_examples=200, deadline=None)
@given(hard_positive_data(), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 20))
def test_zeros_nan_inf_are_counted_and_excluded(data, nans, posinfs, neginfs, zeros):
    mixed = np.concatenate([data, [np.nan] * nans, [np.inf] * posinfs, [-np.inf] * neginfs, np.zeros(zeros)])
    sketch = LogSketch.from_array(np.random.default_rng(0).permutation(mixed))
    assert sketch.count == mixed.size
    assert (sketch.nan, sketch.posinf, sketch.neginf, sketch.zeros) == (nans, posinfs, neginfs, zeros)
    assert sketch.nonfinite == nans + posinfs + neginfs
    finite = mixed[np.isfinite(mixed)]
    assert sketch.min == finite.min() and sketch.max == finite.max()
    assert_quantiles_close(sketch, finite)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)), st.integers(0, 300))
def test_merge_equals_sketch_of_union_and_roundtrips(data, cut):
    cut = min(cut, data.size)
    whole = LogSketch.from_array(data)
    merged = LogSketch.from_array(data[:cut]).merge(LogSketch.from_array(data[cut:]))
    assert merged == whole
    assert LogSketch.from_dict(whole.to_dict()) == whole
    # Mixed signs: the order statistics are still within 1 % of the exact ones.
    for q in QS:
        exact = np.quantile(data, q, method="lower")
        assert abs(whole.quantile(q) - np.quantile(data, q)) <= 0.01 * max(
            abs(exact), abs(np.quantile(data, q, method="higher"))) + 1e-323


@pytest.mark.parametrize("low, high", [(1e-3, 1e3), (1e-300, 1e300)], ids=["dense row", "sort"])
def test_union_of_many_is_the_sketch_of_all_their_data(low, high):
    """Both ways of merging stores: a dense row over a narrow span of keys, a sort otherwise."""
    rng = np.random.default_rng(0)
    parts = [np.exp(rng.uniform(np.log(low), np.log(high), rng.integers(0, 200))) * rng.choice([-1, 1])
             for _ in range(30)]
    union = LogSketch.union([LogSketch.from_array(part) for part in parts])
    assert union == LogSketch.from_array(np.concatenate(parts))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(-3.0000000054977558e+38, 3.0000000054977558e+38, width=32,
                                            allow_subnormal=False)))
def test_float32_bit_buckets_match_the_numpy_sketch(data):
    """The device path (bits >> shift, bincount) gives exactly the keys of the numpy path."""
    bits = data.view(np.int32)
    counts = np.bincount((bits >> mapping.FLOAT32_SHIFT) & (mapping.FLOAT32_BUCKETS - 1),
                         minlength=mapping.FLOAT32_BUCKETS)
    as64 = data.astype(np.float64)
    device = LogSketch.from_float32_buckets(counts, min=as64.min(), max=as64.max(), sum=as64.sum(),
                                            sum_squares=float(np.dot(as64, as64)))
    assert device == LogSketch.from_array(as64)


def test_empty_and_histogram():
    empty = LogSketch()
    assert np.isnan(empty.quantile(0.5)) and np.isnan(empty.mean) and empty.count == 0
    data = np.geomspace(1e-3, 1e3, 601)
    edges, counts = LogSketch.from_array(data).histogram(bins_per_decade=5)
    assert counts.sum() == data.size
    # Bins follow the buckets: a bucket straddling an edge counts in the lower bin.
    assert edges[0] <= 1e-3 <= edges[1] * 1.0001 and edges[-2] <= 1e3 <= edges[-1]
    with pytest.raises(ValueError):
        LogSketch.from_array(data).quantile(1.5)
