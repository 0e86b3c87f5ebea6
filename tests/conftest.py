"""Shared test configuration: frameworks are optional, tests skip with a message."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI replays the same examples every run (a red CI must mean a regression, not a new draw);
# local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
