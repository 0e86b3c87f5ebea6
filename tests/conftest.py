"""Shared test configuration: frameworks are optional, tests skip with a message."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter
# (tests/test_torch_triton.py); triton reads the switch when it is first imported, which
# other test modules do at collection (lightning, bitsandbytes), so it is set here.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
