"""lrscope.downsample: the points kept are those M4 keeps in every bucket, however they arrive."""

from __future__ import annotations

import numpy as np
import pytest

from lrscope import downsample
from lrscope.downsample import Downsampled


def _m4(steps: np.ndarray, values: np.ndarray, level: int) -> set[int]:
    """The steps of the first, last, lowest and highest point of each bucket, one by one."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, step in enumerate(steps):
        key = (int(step) >> level, int(np.floor(np.log2(step + 1.0) * downsample.LOG_BUCKETS_PER_OCTAVE)))
        buckets.setdefault(key, []).append(index)
    kept = set()
    for members in buckets.values():
        by_value = sorted(members, key=lambda i: (values[i], i))
        kept |= {members[0], members[-1], by_value[0], by_value[-1]}
    return {int(steps[i]) for i in kept}


@pytest.mark.parametrize("seed", range(4))
def test_points_arriving_one_by_one_or_in_arrays_keep_each_buckets_extremes(seed, monkeypatch):
    monkeypatch.setattr(downsample, "LINEAR_BUCKETS", 64)
    monkeypatch.setattr(downsample, "PENDING", 100)
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(1, 4, 20_000))
    values = rng.normal(size=steps.size)
    values[rng.integers(steps.size)] = 50.0  # a spike
    one, arrays = Downsampled(), Downsampled()
    for step, value in zip(steps.tolist(), values.tolist()):
        one.add(step, value)
    cuts = np.sort(rng.choice(np.arange(1, steps.size), 30, replace=False))
    for part_steps, part_values in zip(np.split(steps, cuts), np.split(values, cuts)):
        arrays.extend(part_steps, part_values)
    for series in (one, arrays):
        kept_steps, kept_values = series.points()
        assert set(kept_steps.tolist()) == _m4(steps, values, series.level)
        assert np.array_equal(kept_values, values[np.searchsorted(steps, kept_steps)])
        assert kept_values.max() == 50.0 and kept_steps.size < 4 * (64 + 64 * 15)


def test_a_step_that_goes_back_drops_the_points_from_there_on():
    series = Downsampled()
    for step in range(1, 10_001):
        series.add(step, float(step))
    series.add(5_000, -1.0)  # a restart at 5,000
    series.add(5_001, -2.0)
    steps, values = series.points()
    assert steps[-3:].tolist()[-2:] == [5_000, 5_001] and values[-2:].tolist() == [-1.0, -2.0]
    assert np.all(np.diff(steps) > 0) and steps[steps < 5_000].size == steps.size - 2
    series.truncate(3)
    assert series.points()[0].tolist() == [1, 2]
