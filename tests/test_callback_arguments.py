"""Every training-loop callback checks ``every`` and ``sinks`` when it is made, not when
training starts (Keras' had split ``sinks="runs/x"`` into characters and failed at ``fit``)."""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import require

CALLBACKS = [("keras", "lrscope.keras", "EffectiveLRCallback"),
             ("lightning", "lrscope.lightning", "EffectiveLRMonitor"),
             ("transformers", "lrscope.transformers", "EffectiveLRCallback")]


@pytest.mark.parametrize("framework,module,name", CALLBACKS, ids=[c[0] for c in CALLBACKS])
def test_bad_arguments_fail_when_the_callback_is_made(framework, module, name):
    require(framework)
    callback = getattr(importlib.import_module(module), name)
    for every in (0, 2.5):
        with pytest.raises(ValueError, match="every must be a positive whole number of steps"):
            callback(every=every)
    with pytest.raises(TypeError, match="sinks= takes a list of sinks.*got 'runs/x'"):
        callback(sinks="runs/x")
