"""What the third-party optimizer tests share (test_torch_third_party, test_torch_timm_bnb,
test_torch_more_optimizers): the optional packages, timm's optimizers without its package
``__init__``, and the checks besides ``lrscope.testing.check_identity`` that every modelled
optimizer gets: a monitor does not change training, an unknown option is reported and not
modelled.

timm's package ``__init__`` imports torchvision (``timm.layers``), which cannot be loaded
beside the CPU build of torch these tests run on (its compiled ops need CUDA torch).  The
optimizers' own modules import only torch and ``timm.optim._helpers``/``_types`` (and each
other), so where ``import timm`` fails, ``timm_optimizer`` loads those real modules under
their own names without running the package ``__init__`` files; nothing is replaced.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from typing import Any, Callable

import pytest

import lrscope

#: The run's findings (a d still growing after a few steps) are not what these tests check;
#: bitsandbytes warns that its paged optimizers run unpaged on the CPU.
FILTERS = [pytest.mark.filterwarnings("ignore:lrscope finding"),
           pytest.mark.filterwarnings("ignore:lrscope. checking the findings"),
           pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")]


def package(name: str) -> Any:
    """The installed package ``name``, or the test is skipped (a ``dev`` extra)."""
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[dev]')")


def descend(p: Any, noise: Any) -> Any:
    """A quadratic's gradient plus noise (``check_identity``'s ``gradient``): adaptive
    step sizes (Prodigy's and D-Adaptation's d) grow."""
    return 3 * p + 0.1 * noise


def timm_optimizer(module: str, name: str) -> Any:
    """The class ``timm.optim.<module>.<name>``, imported normally, else (no torchvision
    that loads) from timm's real module files without the package ``__init__``."""
    try:
        return getattr(importlib.import_module(f"timm.optim.{module}"), name)
    except ImportError as error:
        if importlib.util.find_spec("timm") is None:
            pytest.skip(f"timm is not installed (make install-test): {error}")
        reason: Exception = error
    except RuntimeError as error:  # torchvision's ops failing to register
        reason = error
    root = os.path.dirname(importlib.util.find_spec("timm").origin)
    shells = []
    for name_, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
        if name_ not in sys.modules:
            shell = types.ModuleType(name_, f"timm's package without its __init__ ({reason})")
            shell.__path__ = [path]
            sys.modules[name_] = shell
            shells.append(name_)
    try:
        return getattr(importlib.import_module(f"timm.optim.{module}"), name)
    finally:  # a later ``import timm`` tries the real package again
        for name_ in shells:
            sys.modules.pop(name_, None)


def assert_watch_does_not_change_training(factory: Callable[[list[Any]], Any], shapes: Any, *,
                                          steps: int = 12, every: int = 3) -> None:
    """SPEC §5: the parameters after ``steps`` real steps are bitwise the same with and
    without a monitor (``every`` steps measured)."""
    import torch

    results = []
    for watched in (False, True):
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        optimizer = factory(params)
        monitor = lrscope.watch(optimizer, every=every, findings=False) if watched else None
        for _ in range(steps):
            if hasattr(optimizer, "train"):
                optimizer.train()
            for p in params:
                p.grad = 3 * p.detach() + torch.randn(p.shape, generator=g)
            optimizer.step()
        if monitor:
            monitor.close()
        results.append([p.detach().clone() for p in params])
    for plain, watched_ in zip(*results):
        assert torch.equal(plain, watched_)


def assert_unknown_option_reported(factory: Callable[[list[Any]], Any], key: str, value: Any,
                                   shape: tuple[int, ...] = (4, 3)) -> None:
    """Setting group option ``key`` to ``value`` (one lrscope does not model) is reported
    in the notes, and the group's distributions are skipped rather than mis-modelled."""
    import torch

    params = [torch.nn.Parameter(torch.randn(shape))]
    optimizer = factory(params)
    optimizer.param_groups[0][key] = value
    with warnings.catch_warnings():  # (warned once where the monitor warns of it)
        warnings.simplefilter("ignore")
        with lrscope.watch(optimizer) as monitor:
            if hasattr(optimizer, "train"):
                optimizer.train()
            params[0].grad = torch.randn(shape)
            optimizer.step()
    report = monitor.last
    assert report.family is not None
    assert any(f"{key}=" in note and "not modelled" in note for note in report.notes), report.notes
    assert report.groups[0].effective_lr is None
