"""Series of (step, value) points downsampled as they arrive, for figures.

A figure draws a million steps in about a thousand pixel columns; what a line shows in
one column is its first, last, lowest and highest point there (M4 aggregation: Jugel et
al., "M4: A Visualization-Oriented Time Series Data Aggregation", VLDB 2014).  So the
steps are grouped in buckets and each bucket keeps those four of its points: every point
kept is one that was logged, the extremes (a spike, the bias-correction dip) stay, and the
memory is bounded by the figure's resolution, not by the length of the run.

A bucket is the intersection of a linear one (``2**level`` steps, for axes with a linear
step axis) and a logarithmic one (``LOG_BUCKETS_PER_OCTAVE`` per doubling of t + 1, for
log step axes, where the first steps are spread over as many pixels as the last
millions).  When the linear buckets of a series exceed ``LINEAR_BUCKETS``, ``level``
grows and neighbouring buckets merge; the logarithmic ones number at most 64 per octave
(1,280 for a million steps).

>>> import numpy as np
>>> series = Downsampled()
>>> values = np.sin(np.arange(1, 1_000_001) / 1e5)
>>> values[654_321] = 5.0
>>> series.extend(np.arange(1, 1_000_001), values)
>>> steps, kept = series.points()
>>> steps.size < 20_000, float(kept.max()), steps[:3].tolist(), int(steps[-1])
(True, 5.0, [1, 2, 3], 1000000)
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

#: Linear buckets per series: about two per pixel column of a 13-inch figure at 100 dpi.
LINEAR_BUCKETS = 2048
#: Logarithmic buckets per doubling of t + 1: about one per pixel column of a log step axis
#: six decades wide on 600 pixels (each bucket 1.1 % of t).
LOG_BUCKETS_PER_OCTAVE = 64
#: Points gathered before they are downsampled with numpy.
PENDING = 4096


def _kept(steps: np.ndarray, values: np.ndarray, level: int) -> np.ndarray:
    """Indices of the first, last, lowest and highest point of every bucket (in order)."""
    if steps.size <= 4:
        return np.arange(steps.size)
    linear = steps >> level
    logarithmic = np.floor(np.log2(steps + 1.0) * LOG_BUCKETS_PER_OCTAVE)
    new = np.empty(steps.size, bool)
    new[0] = True
    np.not_equal(linear[1:], linear[:-1], out=new[1:])
    new[1:] |= logarithmic[1:] != logarithmic[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], steps.size) - 1
    bucket = np.cumsum(new)
    by_value = np.lexsort((values, bucket))  # each bucket's span, sorted by value
    kept = np.zeros(steps.size, bool)
    kept[starts] = kept[ends] = kept[by_value[starts]] = kept[by_value[ends]] = True
    return np.flatnonzero(kept)


class Downsampled:
    """One series, downsampled as points arrive (``add`` one, ``extend`` an array), in
    non-decreasing steps; a step lower than the last removes the points from that step on
    first (TensorBoard's rule for a step counter that goes back), as ``truncate`` does."""

    __slots__ = ("level", "_steps", "_values", "_pending_steps", "_pending_values", "last")

    def __init__(self) -> None:
        self.level = 0
        self._steps = np.empty(0, np.int64)
        self._values = np.empty(0, np.float64)
        self._pending_steps = array("q")
        self._pending_values = array("d")
        self.last = -1  # the last step added

    def add(self, step: int, value: float) -> None:
        if step < self.last:
            self.truncate(step)
        self.last = step
        self._pending_steps.append(step)
        self._pending_values.append(value)
        if len(self._pending_steps) >= PENDING:
            self._flush()

    def extend(self, steps: Any, values: Any) -> None:
        """Add points in non-decreasing steps (numpy arrays, as ``lrscope curve`` has them)."""
        steps, values = np.asarray(steps, np.int64), np.asarray(values, np.float64)
        if not steps.size:
            return
        if steps[0] < self.last:
            self.truncate(int(steps[0]))
        self._flush()
        for start in range(0, steps.size, 1 << 20):
            self._merge(steps[start:start + (1 << 20)], values[start:start + (1 << 20)])
        self.last = int(steps[-1])

    def truncate(self, step: int) -> None:
        """Remove the points at ``step`` and after."""
        pending_steps, pending_values = self._pending_steps, self._pending_values
        while pending_steps and pending_steps[-1] >= step:
            pending_steps.pop()
            pending_values.pop()
        if not pending_steps and self._steps.size and self._steps[-1] >= step:
            keep = int(np.searchsorted(self._steps, step))
            self._steps, self._values = self._steps[:keep], self._values[:keep]
        self.last = min(self.last, step - 1)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` kept: int64 and float64 arrays."""
        self._flush()
        return self._steps, self._values

    def _flush(self) -> None:
        if self._pending_steps:
            steps = np.frombuffer(self._pending_steps, np.int64).copy()
            values = np.frombuffer(self._pending_values, np.float64).copy()
            del self._pending_steps[:], self._pending_values[:]
            self._merge(steps, values)

    def _merge(self, steps: np.ndarray, values: np.ndarray) -> None:
        """Downsample the new points with the kept points of the bucket they continue."""
        first = int(steps[0]) if not self._steps.size else int(self._steps[0])
        level = self.level
        while (int(steps[-1]) >> level) - (first >> level) >= LINEAR_BUCKETS:
            level += 1
        if level != self.level:  # coarser buckets: every kept point is downsampled again
            self.level, start = level, 0
        else:
            start = int(np.searchsorted(self._steps, (int(steps[0]) >> level) << level))
        steps = np.concatenate((self._steps[start:], steps))
        values = np.concatenate((self._values[start:], values))
        kept = _kept(steps, values, level)
        self._steps = np.concatenate((self._steps[:start], steps[kept]))
        self._values = np.concatenate((self._values[:start], values[kept]))
