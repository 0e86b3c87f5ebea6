"""``lrscope.register``: a user's optimizer modelled once, matched by class identity along
the MRO, checked against its real step by ``lrscope.testing.check_identity``."""

from __future__ import annotations

import math
import sys
import types

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope import formulas, registry  # noqa: E402
from lrscope.formulas import Elementwise  # noqa: E402
from lrscope.testing import check_identity  # noqa: E402
from lrscope.torch.optimizers import FAMILY_OF  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:lrscope finding")


class ScaledSign(torch.optim.Optimizer):
    """theta <- theta - lr * scale * sign(g), with a linear warmup it applies inside step()
    and publishes as ``group["applied_lr"]``, and a step counter ``group["k"]``."""

    def __init__(self, params, lr=0.01, scale=2.0, warmup=3):
        super().__init__(params, dict(lr=lr, scale=scale, warmup=warmup, k=0, applied_lr=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["k"] += 1
            group["applied_lr"] = group["lr"] * min(1.0, group["k"] / group["warmup"])
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["applied_lr"] * group["scale"])


class ScaledSignFamily:
    """The formula, stated once: d = sign(g), eta = lr * scale (one value per group)."""

    NAMES = ("scaled_sign_test",)
    USES_STEP = False
    STATELESS = True  # the optimizer keeps no state per tensor
    DEFAULTS = {"torch": {"lr": 0.01, "scale": 2.0}}

    @staticmethod
    def step_sizes(xp, t, h, convention):
        return {"step_size": h["lr"] * h["scale"]}

    @staticmethod
    def elementwise(xp, state, t, h, convention):
        return Elementwise(eta=h["lr"] * h["scale"], direction=xp.sign(state["grad"]))


class WrongFamily(ScaledSignFamily):
    NAMES = ("scaled_sign_wrong_test",)

    @staticmethod
    def elementwise(xp, state, t, h, convention):  # forgets the scale
        return Elementwise(eta=h["lr"], direction=xp.sign(state["grad"]))


@pytest.fixture
def registered():
    model = lrscope.register(ScaledSign, ScaledSignFamily, scalars=lambda step: {"lr": step.after["applied_lr"]},
                             neutral=("warmup", "k", "applied_lr"), counter="k", lr_source="applied_lr")
    yield model
    registry.unregister(ScaledSign)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_registered_optimizer_passes_the_identity(registered, dtype):
    reports = check_identity(lambda params: ScaledSign(params, lr=0.05), dtype=dtype, steps=4)
    for t, report in enumerate(reports, start=1):
        group = report.groups[0]
        assert report.family == "scaled_sign_test" and report.t == t
        assert group.lr == pytest.approx(0.05 * min(1.0, t / 3)) and group.lr_source == "applied_lr"
        assert group.step_size == pytest.approx(2 * group.lr)


def test_a_wrong_model_fails_the_identity():
    lrscope.register(ScaledSign, WrongFamily, scalars=lambda step: {"lr": step.after["applied_lr"]},
                     neutral=("warmup", "k", "applied_lr"), counter="k")
    try:
        with pytest.raises(AssertionError, match="delta != -eta"):
            check_identity(lambda params: ScaledSign(params, lr=0.05))
    finally:
        registry.unregister(ScaledSign)


def test_matching_is_by_class_along_the_mro(registered):
    class Inherits(ScaledSign):
        pass

    class Overrides(ScaledSign):
        def step(self, closure=None):
            return super().step(closure)

    class SameName(torch.optim.Optimizer):  # a class named like a registered one is not it
        def step(self, closure=None):
            pass

    SameName.__name__ = SameName.__qualname__ = "ScaledSign"
    assert registry.model_for(Inherits) is registered
    assert registry.model_for(Overrides) is None
    assert registry.model_for(SameName) is None
    w = torch.nn.Parameter(torch.ones(2))
    assert lrscope.inspect(Overrides([w])).family is None


def test_an_unregistered_option_is_reported(registered):
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = ScaledSign([w])
    optimizer.param_groups[0]["nesterov"] = True
    w.grad = torch.ones(3)
    optimizer.step()
    report = lrscope.inspect(optimizer)
    assert any("nesterov=True" in note and "not modelled" in note for note in report.notes)
    assert report.groups[0].effective_lr is None


def test_a_class_named_by_module_waits_for_its_import():
    """"module:Qualname" never imports the module; once imported, the class itself is
    matched (this is how lrscope registers prodigyopt, dadaptation and schedulefree)."""
    name = "lrscope_test_lazy_optimizers"
    registry.register(f"{name}:Outer.Inner", "sgd")
    try:
        assert name not in sys.modules
        module = types.ModuleType(name)

        class Outer:
            class Inner(torch.optim.SGD):
                pass

        module.Outer = Outer
        sys.modules[name] = module
        assert registry.model_for(Outer.Inner).family == "sgd"
    finally:
        sys.modules.pop(name, None)
        registry.unregister(Outer.Inner)


def test_builtin_models_use_the_registry():
    for cls, family in FAMILY_OF.items():
        assert registry.model_for(cls).family == family
    if hasattr(torch.optim, "Muon"):
        assert registry.model_for(torch.optim.Muon).family == "muon"
    assert "prodigyopt:Prodigy" in registry.models() or registry.model_for(
        sys.modules["prodigyopt"].Prodigy) is not None


def test_register_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="unknown optimizer"):
        lrscope.register(ScaledSign, "no_such_family")
    with pytest.raises(TypeError, match="optimizer's class"):
        lrscope.register(ScaledSign([torch.nn.Parameter(torch.ones(1))]), "sgd")  # an instance
    with pytest.raises(ValueError, match="taken"):
        class Clash(ScaledSignFamily):
            NAMES = ("adam",)

        formulas.register_family(Clash)
    with pytest.raises(TypeError, match="a family needs"):
        formulas.register_family(object())


def test_unknown_scalar_is_nan_with_a_note(registered):
    def needs_before(step):
        return {"lr": step.recorded("applied_lr")}

    lrscope.register(ScaledSign, ScaledSignFamily, scalars=needs_before, neutral=("warmup", "k", "applied_lr"),
                     counter="k")
    try:
        w = torch.nn.Parameter(torch.ones(3))
        optimizer = ScaledSign([w])
        w.grad = torch.ones(3)
        optimizer.step()
        report = lrscope.inspect(optimizer)  # no pre-step hook: the value is unknown
        assert math.isnan(report.groups[0].step_size)
        assert any("lrscope.watch()" in note for note in report.notes)
    finally:
        registry.unregister(ScaledSign)
