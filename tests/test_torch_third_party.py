"""Muon, Prodigy, D-Adaptation and schedule-free against their real steps (SPEC §5, §6).

One table of cases run through ``lrscope.testing.check_identity`` (the helper anyone
registering an optimizer uses), in float64 and float32; then what the identity cannot see:
the step size ``d * lr`` as the step applied it, Muon's per-matrix eta, schedule-free's
lr, averaging weight and train/eval modes, options lrscope does not model.
"""

from __future__ import annotations

import math

import pytest

from tests._optimizer_identity import (FILTERS, assert_unknown_option_reported,
                                       assert_watch_does_not_change_training, descend, package)
from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope import formulas  # noqa: E402
from lrscope.testing import check_identity  # noqa: E402

pytestmark = FILTERS


def _muon(**options):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    return lambda params: torch.optim.Muon(params, **options)


def _third(package_name: str, cls: str, **options):
    return lambda params: getattr(package(package_name), cls)(params, **options)


def _two_groups(package_name: str, cls: str, **options):
    """The first parameter in a group of lr 0: Prodigy and D-Adaptation still move it by
    the largest lr's step size (a group's lr only gates its moments)."""
    return lambda params: getattr(package(package_name), cls)(
        [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}], **options)


MATRICES = ((8, 4), (3, 6), (5, 5))
SCHEDULE = dict(scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.7))
TRAIN = dict(before_step=lambda optimizer, step: optimizer.train())

# (id, factory (params -> optimizer), check_identity options)
CASES = [
    ("muon", lambda: _muon(lr=0.02), dict(shapes=MATRICES, **SCHEDULE)),
    ("muon-match-rms-adamw", lambda: _muon(lr=0.02, adjust_lr_fn="match_rms_adamw"), dict(shapes=MATRICES)),
    ("muon-tensor-lr", lambda: _muon(lr=torch.tensor(0.02)), dict(shapes=MATRICES, **SCHEDULE)),
    ("muon-original-no-nesterov-no-wd", lambda: _muon(lr=0.02, adjust_lr_fn="original", nesterov=False,
                                                      weight_decay=0.0), dict(shapes=MATRICES)),
    ("prodigy", lambda: _third("prodigyopt", "Prodigy"), dict(gradient=descend, steps=8, **SCHEDULE)),
    ("prodigy-bias-correction-decoupled-wd", lambda: _third("prodigyopt", "Prodigy", use_bias_correction=True,
                                                            weight_decay=0.1), dict(gradient=descend, steps=8)),
    ("prodigy-coupled-wd-beta1-0", lambda: _third("prodigyopt", "Prodigy", betas=(0.0, 0.99), weight_decay=0.1,
                                                  decouple=False), dict(gradient=descend, steps=8)),
    ("prodigy-group-lr-0", lambda: _two_groups("prodigyopt", "Prodigy"), dict(gradient=descend, steps=6)),
    ("dadapt-adam", lambda: _third("dadaptation", "DAdaptAdam"), dict(gradient=descend, steps=8)),
    ("dadapt-adam-decoupled-bias-correction", lambda: _third("dadaptation", "DAdaptAdam", decouple=True,
                                                             weight_decay=0.1, use_bias_correction=True),
     dict(gradient=descend, steps=8)),
    ("dadapt-sgd", lambda: _third("dadaptation", "DAdaptSGD"), dict(gradient=descend, steps=8)),
    ("dadapt-sgd-momentum-wd", lambda: _third("dadaptation", "DAdaptSGD", momentum=0.9, weight_decay=0.01),
     dict(gradient=descend, steps=8)),
    ("dadapt-adagrad", lambda: _third("dadaptation", "DAdaptAdaGrad"), dict(gradient=descend, steps=8)),
    ("dadapt-adagrad-momentum-wd", lambda: _third("dadaptation", "DAdaptAdaGrad", momentum=0.9,
                                                  weight_decay=0.01), dict(gradient=descend, steps=8)),
    ("schedulefree-adamw-warmup", lambda: _third("schedulefree", "AdamWScheduleFree", lr=0.01, warmup_steps=3),
     dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-adamw-wd-r-loop", lambda: _third("schedulefree", "AdamWScheduleFree", lr=0.01,
                                                    weight_decay=0.1, r=0.5, foreach=False),
     dict(steps=6, **TRAIN)),
    ("schedulefree-sgd-warmup", lambda: _third("schedulefree", "SGDScheduleFree", lr=0.1, warmup_steps=2),
     dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-sgd-wd-loop", lambda: _third("schedulefree", "SGDScheduleFree", lr=0.1, weight_decay=0.1,
                                                foreach=False), dict(steps=6, **TRAIN)),
    # rho_t > 4 from t = 6 with beta2 = 0.999: the silent SGD phase (lr 0), then Adam steps.
    ("schedulefree-radam", lambda: _third("schedulefree", "RAdamScheduleFree", lr=0.01),
     dict(direction_is_gradient=True, steps=8, **TRAIN)),
    ("schedulefree-radam-sgd-phase-wd", lambda: _third("schedulefree", "RAdamScheduleFree", lr=0.01,
                                                       silent_sgd_phase=False, weight_decay=0.1),
     dict(steps=8, **TRAIN)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id,factory,options", CASES, ids=[c[0] for c in CASES])
def test_identity_against_real_step(case_id, factory, options, dtype):
    reports = check_identity(factory(), dtype=dtype, **options)
    assert [r.t for r in reports] == list(range(1, len(reports) + 1))


@pytest.mark.parametrize("case_id", ["prodigy", "dadapt-adam", "schedulefree-adamw-warmup"])
def test_large_tensor_statistics(case_id):
    """A tensor large enough for the compiled statistics (``torch.fused``): the family's
    per-step scalars (d, the lr, ckp1) are arguments, and the report matches eta."""
    _, factory, options = next(c for c in CASES if c[0] == case_id)
    options = {**options, "steps": 3, "shapes": ((300, 300), (7,))}
    check_identity(factory(), dtype="float32", **options)


def test_muon_eta_per_matrix_and_decay_with_unadjusted_lr():
    optimizer_of = _muon(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    shapes = {"tall": (16, 4), "wide": (4, 9)}
    params = {name: torch.nn.Parameter(torch.randn(shape)) for name, shape in shapes.items()}
    optimizer = optimizer_of(list(params.values()))
    with lrscope.watch(optimizer) as monitor:
        for p in params.values():
            p.grad = torch.randn(p.shape)
        optimizer.step()
    group = monitor.last.groups[0]
    assert group.step_size == 0.02 and group.weight_decay_rate == pytest.approx(0.02 * 0.1)
    for index, shape in enumerate(shapes.values()):
        eta = group.params[f"param{index}"].effective_lr
        expected = 0.02 * 0.2 * math.sqrt(max(shape))  # torch's _adjust_lr, the global shape
        assert eta.min == eta.max == pytest.approx(expected, rel=1e-6)
    assert lrscope.step_size("muon", 1, lr=0.02, shape=(16, 4)) == pytest.approx(0.04)


def test_muon_eta_uses_the_given_global_shape():
    """Under sharding the scale is the whole matrix's: the formula takes ``shape`` (a
    DTensor's, which is global), not the shard's own."""
    muon = formulas.family("muon")
    h = formulas.hyperparameters("muon", lr=0.1)
    shard = torch.ones(2, 4)  # the local rows of an (8, 4) matrix
    el = muon.elementwise(torch, {"param": shard, "orthogonalized": shard, "shape": (8, 4)}, 1, h, "torch")
    assert el.eta == pytest.approx(0.1 * math.sqrt(8 / 4))


def _record_steps(optimizer, steps, before=None):
    """Step with a descending gradient; before each step record the groups' d, k and lr."""
    g = torch.Generator().manual_seed(1)
    records = []
    with lrscope.watch(optimizer) as monitor:
        for step in range(steps):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = 3 * p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            records.append([dict(group) for group in optimizer.param_groups])
            optimizer.step()
            records[-1] = (records[-1], monitor.last)
    return records


@pytest.mark.parametrize("name,cls,options,expected", [
    ("prodigyopt", "Prodigy", dict(use_bias_correction=True),
     lambda before, after, t: before[0]["d"] * 1.0 * (math.sqrt(1 - 0.999**t) / (1 - 0.9**t))),
    ("dadaptation", "DAdaptAdam", dict(), lambda before, after, t: before[0]["d"] * 1.0),
    ("dadaptation", "DAdaptSGD", dict(), lambda before, after, t: before[0]["d"] * 1.0 / after[0]["g0_norm"]),
    ("dadaptation", "DAdaptAdaGrad", dict(), lambda before, after, t: before[0]["d"] * 1.0),
], ids=["prodigy", "dadapt-adam", "dadapt-sgd", "dadapt-adagrad"])
def test_step_size_is_d_times_lr_as_the_step_applied_it(name, cls, options, expected):
    """The identity cannot see a factor that is both in m and out of it (DAdaptAdam's
    step size sits inside m): the reported step size is checked against the d the group
    held before the step, independently of the model."""
    params = [torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    optimizer = getattr(package(name), cls)(params, lr=1.0, **options)
    changed = 0
    for t, (before, report) in enumerate(_record_steps(optimizer, 8), start=1):
        group = report.groups[0]
        assert group.step_size == pytest.approx(expected(before, optimizer.param_groups, t), rel=1e-15)
        assert group.extra["d"] == before[0]["d"]
        changed += group.extra["d_next"] != group.extra["d"]
        assert report.t == t
    assert changed, "d never changed: the test would not tell d from the next step's d"


def test_prodigy_lr_is_the_largest_over_groups_and_scheduled():
    prodigyopt = package("prodigyopt")
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    optimizer = prodigyopt.Prodigy([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
    with lrscope.watch(optimizer) as monitor:
        for t in range(1, 4):
            a.grad, b.grad = torch.ones(5), torch.ones(3)
            d = optimizer.param_groups[0]["d"]
            optimizer.step()
            scheduler.step()
            for group in monitor.last.groups:
                assert group.lr == pytest.approx(0.5 / t) and group.lr_source == "max(lr)"
                assert group.step_size == pytest.approx(d * 0.5 / t)


def test_prodigy_inspect_knows_d_only_at_the_first_step():
    prodigyopt = package("prodigyopt")
    w = torch.nn.Parameter(torch.randn(4))
    optimizer = prodigyopt.Prodigy([w], lr=1.0, d0=1e-5)
    w.grad = torch.randn(4)
    optimizer.step()
    assert lrscope.inspect(optimizer).groups[0].step_size == pytest.approx(1e-5)
    w.grad = torch.randn(4)
    optimizer.step()
    report = lrscope.inspect(optimizer)
    assert math.isnan(report.groups[0].step_size) and report.groups[0].effective_lr is None
    assert any("use lrscope.watch()" in note for note in report.notes)


def test_prodigy_step_that_returned_early_is_not_modelled():
    """All gradients zero: Prodigy returns before moving the parameters (k stays)."""
    prodigyopt = package("prodigyopt")
    w = torch.nn.Parameter(torch.randn(4))
    optimizer = prodigyopt.Prodigy([w], lr=1.0)
    with lrscope.watch(optimizer) as monitor:
        w.grad = torch.zeros(4)
        optimizer.step()
    assert math.isnan(monitor.last.groups[0].step_size)
    assert any("returned early" in note for note in monitor.last.notes)


def test_schedule_free_lr_weight_and_modes():
    """lr is the warmed-up ``scheduled_lr``, ``ckp1`` the averaging weight; eval() and
    train() switch the parameters between x and y without a step: no report, and a report
    read in eval mode describes the same step."""
    schedulefree = package("schedulefree")
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    optimizer = schedulefree.AdamWScheduleFree([w], lr=0.01, warmup_steps=4)
    optimizer.train()
    with lrscope.watch(optimizer) as monitor:
        for t in range(1, 4):
            w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
            optimizer.step()
            group = monitor.last.groups[0]
            assert group.lr == pytest.approx(0.01 * t / 4) == optimizer.param_groups[0]["scheduled_lr"]
            assert group.lr_source == "scheduled_lr"
            weights = [(k * 0.01 / 4) ** 2 for k in range(1, t + 1)]
            assert group.extra["ckp1"] == pytest.approx(weights[-1] / sum(weights))
        train = lrscope.inspect(optimizer).groups[0]
        optimizer.eval()
        evaluated = lrscope.inspect(optimizer).groups[0]
        optimizer.train()
        assert monitor.last.t == 3  # the switches were no step
    assert evaluated.effective_lr.summary() == pytest.approx(train.effective_lr.summary(), rel=1e-12)
    assert evaluated.update_norm == pytest.approx(train.update_norm, rel=1e-9)


@pytest.mark.parametrize("case_id", [c[0] for c in CASES if "group-lr-0" not in c[0]][::3])
def test_watch_does_not_change_training(case_id):
    _, factory, options = next(c for c in CASES if c[0] == case_id)
    assert_watch_does_not_change_training(factory(), options.get("shapes", ((4, 3), (5,))))


@pytest.mark.parametrize("factory,key,value", [
    (lambda: _muon(lr=0.02), "adjust_lr_fn", "spectral"),  # torch would silently not scale
    (lambda: _third("prodigyopt", "Prodigy"), "a_new_option", True),
    (lambda: _third("schedulefree", "AdamWScheduleFree"), "inner_momentum", 0.5),
    (lambda: _third("dadaptation", "DAdaptAdam"), "a_new_option", 1.0),
], ids=["muon-adjust-lr-fn", "prodigy", "schedulefree", "dadapt-adam"])
def test_unknown_options_are_reported_not_modelled(factory, key, value):
    assert_unknown_option_reported(factory(), key, value)
