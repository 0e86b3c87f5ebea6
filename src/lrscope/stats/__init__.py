"""Framework-free statistics: the mergeable log-bucket sketch and its mapping."""

from lrscope.stats.sketch import LogSketch

__all__ = ["LogSketch"]
