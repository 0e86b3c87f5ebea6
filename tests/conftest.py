"""Shared test configuration: frameworks are optional, tests skip with a message."""

from __future__ import annotations

import pytest


def require(module: str):
    """Import ``module`` or skip the calling test module, naming what is missing."""
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'lrscope[all]')")


class CollectSink:
    """A sink keeping every report it is given, in order."""

    def __init__(self) -> None:
        self.reports: list = []

    def write(self, report) -> None:
        self.reports.append(report)

    def close(self) -> None:
        pass
