"""`import lrscope` (and its framework-free parts) never imports a framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "optax", "flax")


def test_import_lrscope_imports_no_framework():
    code = (
        "import sys, lrscope, lrscope.formulas, lrscope.stats, lrscope.report, lrscope.cli, "
        "lrscope.curve, lrscope.schedules, lrscope.sinks\n"
        "lrscope.step_size_curve('adam', 100, lr=1e-3)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"frameworks imported: {out.stdout}"


def test_missing_optional_dependency_names_the_extra():
    from lrscope._optional import require

    with pytest.raises(ImportError, match=r"pip install 'lrscope\[plot\]'"):
        require("a_module_that_does_not_exist", "plot")


def test_unknown_object_gets_a_clear_error():
    import lrscope

    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        lrscope.inspect(object())
