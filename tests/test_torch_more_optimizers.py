"""timm's and pytorch_optimizer's Muon, pytorch_optimizer's LaProp and Lamb, D-Adaptation's
Lion and Adan, and the schedule-free classes besides the three main ones, against their real
steps (SPEC §5, §6).

One table of cases run through ``lrscope.testing.check_identity``, in float64 and float32;
then what the identity cannot see (Muon's eta per matrix, the d a step applied) and the
options lrscope does not model.
"""

from __future__ import annotations

import math

import pytest

from tests._optimizer_identity import (FILTERS, assert_unknown_option_reported,
                                       assert_watch_does_not_change_training, descend, package, timm_optimizer)
from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope.testing import check_identity  # noqa: E402
from lrscope.torch.reader import TorchReader  # noqa: E402

pytestmark = FILTERS


def timm(module: str, name: str, **options):
    return lambda params: timm_optimizer(module, name)(params, **options)


def po(name: str, **options):
    return lambda params: getattr(package("pytorch_optimizer"), name)(params, **options)


def po_muon(**options):
    """pytorch_optimizer's Muon needs its groups: the matrices (``use_muon``) and the others."""
    def build(params):
        matrices = [p for p in params if p.dim() >= 2]
        others = [p for p in params if p.dim() < 2]
        groups = [{"params": matrices, "use_muon": True}] + ([{"params": others, "use_muon": False}]
                                                             if others else [])
        return package("pytorch_optimizer").Muon(groups, **options)
    return build


def third(package_name: str, cls: str, **options):
    return lambda params: getattr(package(package_name), cls)(params, **options)


# Matrices of several shapes (two of the same: pytorch_optimizer batches them), a 3-D tensor
# (flattened to (out, in * k)), a vector and a scalar (the AdamW fallback).
MUON_SHAPES = dict(shapes=((8, 4), (8, 4), (4, 6), (5, 2, 3), (5,), ()), steps=4)
SHAPES = dict(shapes=((4, 3), (5,), (), (3, 2, 2)), steps=5)
NO_SCALAR = dict(shapes=((4, 3), (5,), (3, 2, 2)), steps=5)  # pytorch_optimizer's global norm breaks on 0-d
TRAIN = dict(before_step=lambda optimizer, step: optimizer.train())
SCHEDULE = dict(scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.7))

# (id, factory (params -> optimizer), check_identity options)
CASES = [
    ("timm-muon", lambda: timm("muon", "Muon", lr=0.02), dict(**MUON_SHAPES, **SCHEDULE)),
    ("timm-muon-original-nesterov-wd", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn="original", nesterov=True,
                                                    weight_decay=0.1), MUON_SHAPES),
    ("timm-muon-rms-to-rms-fallback-scale", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn="rms_to_rms",
                                                         fallback_lr_scale=0.5, weight_decay=0.1), MUON_SHAPES),
    ("timm-muon-batched-no-adjust", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn=None, conv_mode="batched",
                                                 ns_coefficients="original"), MUON_SHAPES),
    ("timm-adamuon", lambda: timm("muon", "Muon", lr=0.02, algo="adamuon", weight_decay=0.1),
     dict(**MUON_SHAPES, **SCHEDULE)),
    ("timm-adamuon-rms-to-rms-batched-nesterov", lambda: timm("muon", "Muon", lr=0.02, algo="adamuon",
                                                              adjust_lr_fn="rms_to_rms", conv_mode="batched",
                                                              nesterov=True), MUON_SHAPES),
    ("timm-adamuon-rsqrt-in", lambda: timm("muon", "Muon", lr=0.02, algo="adamuon", adjust_lr_fn="rsqrt_in"),
     MUON_SHAPES),
    ("timm-adamuon-no-adjust", lambda: timm("muon", "Muon", lr=0.02, algo="adamuon", adjust_lr_fn=None),
     MUON_SHAPES),
    ("po-muon", lambda: po_muon(lr=0.02), dict(**MUON_SHAPES, **SCHEDULE)),
    ("po-muon-adjusted-wd-loop", lambda: po_muon(lr=0.02, use_adjusted_lr=True, weight_decay=0.1, adamw_wd=0.1,
                                                 foreach=False), MUON_SHAPES),
    ("po-muon-no-nesterov-coupled-maximize", lambda: po_muon(lr=0.02, nesterov=False, weight_decay=0.1,
                                                             weight_decouple=False, maximize=True), MUON_SHAPES),
    ("dadapt-lion", lambda: third("dadaptation", "DAdaptLion", lr=1.0), dict(gradient=descend, steps=8)),
    ("dadapt-lion-wd-group-lr-0", lambda: lambda params: package("dadaptation").DAdaptLion(
        [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}], lr=1.0, weight_decay=0.1),
     dict(gradient=descend, steps=6)),
    ("dadapt-adan", lambda: third("dadaptation", "DAdaptAdan"), dict(gradient=descend, steps=8)),
    ("dadapt-adan-no-prox", lambda: third("dadaptation", "DAdaptAdan", no_prox=True, weight_decay=0.1),
     dict(gradient=descend, steps=8)),
    ("po-laprop", lambda: po("LaProp", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-laprop-wd-loop-maximize", lambda: po("LaProp", lr=0.01, weight_decay=0.1, foreach=False, maximize=True),
     dict(**SHAPES, **SCHEDULE)),
    ("po-laprop-fixed-decay", lambda: po("LaProp", lr=0.01, weight_decay=0.01, fixed_decay=True), SHAPES),
    ("po-laprop-coupled-wd", lambda: po("LaProp", lr=0.01, weight_decay=0.1, weight_decouple=False), SHAPES),
    ("po-mars", lambda: po("MARS", lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("po-mars-lion-1d-loop-maximize", lambda: po("MARS", lr=0.01, mars_type="lion", lr_1d=0.005, weight_decay=0.1,
                                                 foreach=False, maximize=True), SHAPES),
    ("po-mars-optimize-1d-fixed", lambda: po("MARS", lr=0.01, optimize_1d=True, weight_decay=0.01,
                                             fixed_decay=True), SHAPES),
    ("po-mars-coupled", lambda: po("MARS", lr=0.01, weight_decay=0.1, weight_decouple=False), SHAPES),
    ("po-lamb", lambda: po("Lamb", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-lamb-coupled-wd-loop", lambda: po("Lamb", lr=0.01, weight_decay=0.1, weight_decouple=False, foreach=False),
     SHAPES),
    ("po-lamb-decoupled-fixed-pre-norm", lambda: po("Lamb", lr=0.01, weight_decay=0.01, fixed_decay=True,
                                                    pre_norm=True, grad_averaging=False), NO_SCALAR),
    ("po-lamb-large-norm-maximize", lambda: po("Lamb", lr=0.01, weight_decay=0.1, maximize=True),
     dict(shapes=((40, 30), (7,)), steps=4)),  # ||theta|| > 10: capped in the stored ratio
    ("schedulefree-adamw-reference-warmup", lambda: third("schedulefree", "AdamWScheduleFreeReference", lr=0.01,
                                                          warmup_steps=3), dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-adamw-reference-wd-r", lambda: third("schedulefree", "AdamWScheduleFreeReference", lr=0.01,
                                                        weight_decay=0.1, r=0.5), dict(steps=6, **TRAIN)),
    ("schedulefree-sgd-reference-warmup", lambda: third("schedulefree", "SGDScheduleFreeReference", lr=0.1,
                                                        warmup_steps=2), dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-sgd-reference-wd", lambda: third("schedulefree", "SGDScheduleFreeReference", lr=0.1,
                                                    weight_decay=0.1), dict(steps=6, **TRAIN)),
    ("schedulefree-paper-warmup", lambda: third("schedulefree", "AdamWScheduleFreePaper", lr=0.01, warmup_steps=3),
     dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-paper-wd-r-loop", lambda: third("schedulefree", "AdamWScheduleFreePaper", lr=0.01, weight_decay=0.1,
                                                   r=0.5, foreach=False), dict(steps=6, **TRAIN)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id,factory,options", CASES, ids=[c[0] for c in CASES])
def test_identity_against_real_step(case_id, factory, options, dtype):
    reports = check_identity(factory(), dtype=dtype, **options)
    assert [r.t for r in reports] == list(range(1, len(reports) + 1))


@pytest.mark.parametrize("case_id,dtype", [("po-laprop", "float64"), ("po-laprop", "float32"),
                                           ("schedulefree-paper-warmup", "float32"), ("dadapt-adan", "float32"),
                                           ("schedulefree-adamw-reference-wd-r", "float32")])
def test_large_tensor_statistics(case_id, dtype):
    """A tensor large enough for the compiled statistics (``lrscope.torch.fused``): the
    formula is traced and compiled, and the report still describes eta."""
    _, factory, options = next(c for c in CASES if c[0] == case_id)
    check_identity(factory(), dtype=dtype, **{**options, "steps": 3, "shapes": ((300, 300), (7,))})


@pytest.mark.parametrize("factory,adjusted", [
    (timm("muon", "Muon", lr=0.02, weight_decay=0.1), lambda shape: 0.2 * math.sqrt(max(shape))),
    (timm("muon", "Muon", lr=0.02, weight_decay=0.1, adjust_lr_fn="original"),
     lambda shape: math.sqrt(max(1, shape[0] / shape[1]))),
    (timm("muon", "Muon", lr=0.02, weight_decay=0.1, adjust_lr_fn="rms_to_rms"),
     lambda shape: math.sqrt(shape[0] / shape[1])),
    (po_muon(lr=0.02, weight_decay=0.1), lambda shape: math.sqrt(max(1, shape[0] / shape[1]))),
    (po_muon(lr=0.02, weight_decay=0.1, use_adjusted_lr=True), lambda shape: 0.2 * math.sqrt(max(shape))),
], ids=["timm-match-rms-adamw", "timm-original", "timm-rms-to-rms", "po", "po-adjusted"])
def test_muon_eta_is_the_adjusted_lr_of_each_matrix(factory, adjusted):
    """eta is one scalar per matrix, the implementation's scale of its (out, in) shape times
    lr; the decay uses the unadjusted lr; a vector takes the AdamW fallback."""
    shapes = {"tall": (16, 4), "wide": (4, 9), "conv": (6, 2, 3, 3), "bias": (5,)}
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in shapes.values()]
    optimizer = factory(params)
    with lrscope.watch(optimizer, findings=False) as monitor:
        for p in params:
            p.grad = torch.randn(p.shape, dtype=torch.float64)
        optimizer.step()
    report = monitor.last
    assert report.family == "muon_adamw"
    by_name = {name: param for group in report.groups for name, param in group.params.items()}
    for index, (what, shape) in enumerate(shapes.items()):
        eta = by_name[f"param{index}"].effective_lr
        if what == "bias":  # AdamW: lr / (sqrt(v_hat) + eps) per element
            assert eta.min < eta.max
            continue
        matrix = (shape[0], math.prod(shape[1:]))  # the (out, in) Newton-Schulz ran on
        assert eta.min == eta.max == pytest.approx(0.02 * adjusted(matrix), rel=1e-12)
    assert report.groups[0].step_size == 0.02
    assert report.groups[0].weight_decay_rate == pytest.approx(0.02 * 0.1)


@pytest.mark.parametrize("cls,options", [("DAdaptLion", dict(lr=1.0)), ("DAdaptAdan", dict(lr=1.0))])
def test_dadapt_step_size_is_d_times_lr_as_the_step_applied_it(cls, options):
    """The step size is the d the group held before the step times lr, and d is reported;
    the step replaces d by the next step's estimate (``d_next``)."""
    params = [torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    optimizer = getattr(package("dadaptation"), cls)(params, **options)
    g = torch.Generator().manual_seed(1)
    changed = 0
    with lrscope.watch(optimizer, findings=False) as monitor:
        for t in range(1, 9):
            for p in params:
                p.grad = 3 * p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            d = optimizer.param_groups[0]["d"]
            optimizer.step()
            group = monitor.last.groups[0]
            assert group.step_size == pytest.approx(d * 1.0, rel=1e-15) and group.extra["d"] == d
            assert group.extra["d_next"] == optimizer.param_groups[0]["d"] and monitor.last.t == t
            changed += optimizer.param_groups[0]["d"] != d
    assert changed, "d never changed: the test would not tell d from the next step's d"


def test_po_lamb_lr_is_its_step_multiplier():
    """pytorch_optimizer's Lamb multiplies its update by ``lr / (1 - beta1**t)``: that is
    the reported lr, with its source named."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    optimizer = po("Lamb", lr=0.01)([w])
    with lrscope.watch(optimizer, findings=False) as monitor:
        for t in (1, 2):
            w.grad = torch.randn(4, 3, dtype=torch.float64)
            optimizer.step()
            group = monitor.last.groups[0]
            assert group.lr == pytest.approx(0.01 / (1 - 0.9**t)) and group.lr_source == "lr/(1-beta1**t)"


@pytest.mark.parametrize("cls", ["AdamWScheduleFreeReference", "SGDScheduleFreeReference"])
def test_schedule_free_reference_eval_switch_is_not_an_update(cls):
    """The reference classes copy x into the parameters in eval mode and y back in train
    mode: no step is reported, and a report read in eval mode describes the same step."""
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    optimizer = getattr(package("schedulefree"), cls)([w], lr=0.01, warmup_steps=2, weight_decay=0.1)
    optimizer.train()
    with lrscope.watch(optimizer, findings=False) as monitor:
        for _ in range(3):
            w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
            optimizer.step()
        train = lrscope.inspect(optimizer).groups[0]
        optimizer.eval()
        evaluated = lrscope.inspect(optimizer).groups[0]
        optimizer.train()
        assert monitor.last.t == 3
    assert not torch.equal(w.detach(), optimizer.state[w]["x"])  # (x and y differ: the switch moves w)
    assert evaluated.effective_lr.summary() == pytest.approx(train.effective_lr.summary(), rel=1e-12)
    assert evaluated.update_norm == pytest.approx(train.update_norm, rel=1e-12)


EXPECTED_FAMILY = {"timm-muon": "muon_adamw", "po-muon": "muon_adamw", "dadapt-lion": "dadapt_lion",
                   "dadapt-adan": "dadapt_adan", "po-laprop": "laprop", "po-lamb": "lamb", "po-mars": "mars",
                   "schedulefree-paper-warmup": "schedule_free",
                   "schedulefree-adamw-reference-warmup": "schedule_free",
                   "schedulefree-sgd-reference-warmup": "schedule_free"}


@pytest.mark.parametrize("case_id,family", sorted(EXPECTED_FAMILY.items()))
def test_modelled_not_the_fallback(case_id, family):
    _, factory, _ = next(c for c in CASES if c[0] == case_id)
    optimizer = factory()([torch.nn.Parameter(torch.randn(4, 4))])
    assert lrscope.inspect(optimizer).family == family


@pytest.mark.parametrize("case_id", ["timm-muon", "timm-adamuon", "po-muon", "dadapt-lion", "dadapt-adan",
                                     "po-laprop", "po-lamb", "po-mars", "schedulefree-paper-warmup",
                                     "schedulefree-adamw-reference-wd-r", "schedulefree-sgd-reference-wd"])
def test_watch_does_not_change_training(case_id):
    _, factory, _ = next(c for c in CASES if c[0] == case_id)
    assert_watch_does_not_change_training(factory(), ((8, 4), (5,)), steps=6, every=2)


@pytest.mark.parametrize("factory,key,value", [
    (timm("muon", "Muon"), "algo", "polar"),
    (timm("muon", "Muon"), "a_new_option", 1.0),
    (po_muon(), "cautious", True),
    (third("dadaptation", "DAdaptLion"), "a_new_option", 1.0),
    (third("dadaptation", "DAdaptAdan"), "a_new_option", 1.0),
    (po("LaProp"), "centered", True),
    (po("Lamb"), "rectify", True),
    (po("MARS"), "mars_type", "shampoo"),
    (po("Lamb"), "adam", True),
    (third("schedulefree", "AdamWScheduleFreePaper"), "a_new_option", 0.5),
    (third("schedulefree", "AdamWScheduleFreeReference"), "decay_at_z", True),
], ids=["timm-muon-algo", "timm-muon", "po-muon-cautious", "dadapt-lion", "dadapt-adan", "po-laprop-centered",
        "po-lamb-rectify", "po-mars-shampoo", "po-lamb-adam", "schedulefree-paper",
        "schedulefree-reference-decay-at-z"])
def test_unknown_options_are_reported_not_modelled(factory, key, value):
    assert_unknown_option_reported(factory, key, value, shape=(8, 4))


CLOSURE_CASES = [
    ("AdamWScheduleFreeClosure", dict(lr=0.01, warmup_steps=3, weight_decay=0.1, r=0.5)),
    ("AdamWScheduleFreeClosure", dict(lr=0.01, foreach=False)),
    ("SGDScheduleFreeClosure", dict(lr=0.1, warmup_steps=2, weight_decay=0.1)),
    ("RAdamScheduleFreeClosure", dict(lr=0.01, weight_decay=0.1)),  # the silent SGD phase, then Adam steps
]


def _assert_close(actual, expected, atol, relative, what):
    actual, expected = actual.double(), torch.as_tensor(expected).double().expand_as(actual)
    error = (actual - expected).abs().max().item()
    assert error <= atol + relative * actual.abs().max().item(), f"{what}: max error {error:.3g}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls,options", CLOSURE_CASES, ids=["adamw-warmup-wd-r", "adamw-loop", "sgd", "radam"])
def test_schedule_free_closure_identity_against_real_step(cls, options, dtype):
    """The closure classes hold x between steps and evaluate the closure at y, so
    ``check_identity`` (which steps without a closure) cannot drive them: the same checks by
    hand.  From snapshots of x and z before each step, ``z - z_before = -eta * d - lr * wd *
    y_before`` with ``y_before = lerp(x_before, z_before, 1 - beta1)``; x's change is the
    update lrscope rebuilds without a copy; the report's eta is the formula's."""
    dt = getattr(torch, dtype)
    ulp, relative = torch.finfo(dt).eps, (1e-12 if dt == torch.float64 else 1e-5)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dt)) for shape in ((4, 3), (5,), ())]
    optimizer = getattr(package("schedulefree"), cls)(params, **options)
    group = optimizer.param_groups[0]
    beta1 = group["betas"][0] if "betas" in group else group["momentum"]
    reader = TorchReader(optimizer)
    with lrscope.watch(optimizer, findings=False) as monitor:
        for step in range(1, 9):
            noise = [torch.randn(p.shape, generator=g, dtype=dt) for p in params]

            def closure():
                for p, n in zip(params, noise):
                    p.grad = n.clone()
                return 0.0

            x_before = [p.detach().clone() for p in params]
            z_before = [optimizer.state.get(p, {}).get("z", p).detach().clone() for p in params]
            pending = reader.begin(step, True)
            optimizer.step(closure)
            elements = dict(reader.elementwise(pending))
            report = monitor.last
            assert report.t == step and report.family == "schedule_free"
            assert not [n for n in report.notes if "not modelled" in n or "unknown" in n]
            for i, p in enumerate(params):
                el, where = elements[f"param{i}"], f"step {step} param{i}"
                scale = max(x_before[i].abs().max().item(), z_before[i].abs().max().item())
                y_before = x_before[i] + (1 - beta1) * (z_before[i] - x_before[i])
                _assert_close(optimizer.state[p]["z"] - z_before[i], -el.eta * el.direction - el.decay_rate * y_before,
                              4 * ulp * scale, relative, f"{where}: z - z_before != -eta * d - decay")
                _assert_close(p.detach() - x_before[i], el.update(p.detach()), 8 * ulp * scale, relative,
                              f"{where}: the update rebuilt without a copy")
                eta = report.groups[0].params[f"param{i}"].effective_lr
                exact = torch.as_tensor(el.eta).double().expand(p.shape)
                assert eta.count == p.numel() and eta.max == pytest.approx(exact.max().item(), rel=1e-6)
