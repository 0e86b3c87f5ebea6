"""lrscope.optax.monitor against optax.contrib's Prodigy, schedule-free and Muon (SPEC §5, §6).

Real optax steps, theta (and schedule-free's z) snapshotted around each one:

* Prodigy: ``theta_after - theta_before == -eta * d - decay_rate * theta_before`` with
  ``step_size = d * lr * bc`` of the estimate the step used, ``d`` and ``d_next`` read
  from ``ProdigyState.estim_lr`` before and after it;
* schedule-free AdamW/SGD: the same identity on the z-sequence, ``y_before`` decayed,
  the parameters' change predicted by the model check, ``lr`` the z-step's (the schedule
  at ``t - 1``: warmup) and ``ckp1``/``max_lr`` as an independent computation gives them;
* Muon: the matrices' eta one value per tensor, ``lr * scale`` of their fans (dimension
  numbers respected), d the orthogonalized update (recomputed), the other tensors NAdamW;

in float64 (``jax.enable_x64``) and float32, monitored updates bitwise those of the plain
alias, and the options lrscope does not model detected (measured-only, one warning).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lrscope  # noqa: E402
import lrscope.optax  # noqa: E402
from lrscope.optax.model import leaf_names, leaves  # noqa: E402

SHAPES = {"conv": (2, 3, 5), "kernel": (3, 4), "tall": (6, 2), "bias": (4,), "scale": (),
          "frozen": (2, 2)}
STEPS = 6
DECAYING = optax.linear_schedule(1.0, 0.5, 5)  # Prodigy's lr is a multiplier of d
SCHEDULE = optax.linear_schedule(1e-2, 2e-3, 5)


def _scheduled(schedule, t):
    """The schedule as optax evaluates it for step t: at the int32 count t - 1."""
    return float(schedule(jnp.asarray(t - 1, jnp.int32)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _tree(seed, dtype, zero_frozen=False):
    rng = np.random.default_rng(seed)
    tree = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
    if zero_frozen:
        tree["frozen"] = jnp.zeros_like(tree["frozen"])
    return tree


def _run(tx, dtype=np.float64, steps=STEPS):
    """Real jitted steps: [(state before, theta before, theta after, updates, state after)].

    The gradients are those of a quadratic (theta - 1) plus noise, so that Prodigy's
    estimate grows; the frozen tensor's are zero.
    """
    params = _tree(0, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for i in range(steps):
        noise = _tree(10 + i, dtype, zero_frozen=True)
        grads = jax.tree.map(lambda p, n: (p - 1) + 0.1 * n if n.any() else n, params, noise)
        updates, new_state = update(grads, state, params)
        new = optax.apply_updates(params, updates)
        history.append((state, params, new, updates, new_state))
        params, state = new, new_state
    return history


def _monitored_and_plain(alias, kwargs, dtype=np.float64, **options):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitored = _run(lrscope.optax.monitor(alias, keep_arrays=True, check=True, **options,
                                               **kwargs), dtype)
        reports = [lrscope.inspect(step[-1]) for step in monitored]
    plain = _run(alias(**kwargs), dtype)
    for mon, ref in zip(monitored, plain):
        for a, b in zip(jax.tree_util.tree_leaves(mon[2:4]), jax.tree_util.tree_leaves(ref[2:4])):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    warned = [str(w.message) for w in record if str(w.message).startswith("lrscope")]
    return monitored, reports, warned


def _kept(state):
    """{tensor name: (group, its kept eta/direction/decay_rate)}."""
    return {name: (g, kept) for g in state.plan.groups
            for name, kept in zip(g.leaves, state.arrays.get(g.name, ()))}


def _assert_close(actual, expected, what, rtol, rounding=0.0):
    """``actual`` (a difference of two states) equals ``expected`` to ``rtol`` of its largest
    value, plus ``rounding`` (an ulp of the states the difference was taken of)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), np.abs(actual).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + rounding + 1e-300,
                               err_msg=what)


def _ulp(*arrays):
    """Two ulps of the largest of ``arrays``: the rounding of a difference of them."""
    return max(2 * float(np.finfo(np.asarray(a).dtype).eps) * float(np.abs(a).max(initial=0))
               for a in arrays)


def _assert_param_identity(history, rtol):
    """theta_after - theta_before == -eta * d - decay_rate * theta_before, every tensor."""
    for _, before, after, _, state in history:
        names = leaf_names(before)
        theta0 = dict(zip(names, leaves(before)))
        theta1 = dict(zip(names, leaves(after)))
        for name, (_, kept) in _kept(state).items():
            modelled = (-np.asarray(kept["eta"], np.float64) * np.asarray(kept["direction"], np.float64)
                        - float(kept["decay_rate"]) * np.asarray(theta0[name], np.float64))
            _assert_close(np.asarray(theta1[name], np.float64) - np.asarray(theta0[name], np.float64),
                          modelled, f"{name} at t={int(state.steps)}", rtol,
                          _ulp(theta0[name], theta1[name]))


# -- Prodigy -----------------------------------------------------------------------------

PRODIGY = [
    ("default", {}),
    ("decay-betas-eps", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-4}),
    ("beta1-0", {"betas": (0.0, 0.999)}),
    ("estimate-options", {"safeguard_warmup": True, "estim_lr0": 1e-3, "estim_lr_coef": 2.0,
                          "beta3": 0.9}),
]


def _assert_prodigy(history, reports, kwargs, rtol):
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    grew = False
    for (old, _, _, _, new), report in zip(history, reports):
        (group,) = report.groups
        t = report.t
        d, d_next = float(old.inner.estim_lr), float(new.inner.estim_lr)
        dlr = d * _scheduled(DECAYING, t) * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        assert group.extra["d"] == d and group.extra["d_next"] == d_next
        assert group.step_size == pytest.approx(dlr, rel=rtol)
        assert group.lr == pytest.approx(_scheduled(DECAYING, t), rel=max(rtol, 1e-6))
        assert group.weight_decay_rate == pytest.approx(kwargs.get("weight_decay", 0.0) * dlr, rel=rtol)
        assert group.extra["model_error"] < rtol and not report.empirical
        grew |= d_next > d
    return grew


@pytest.mark.parametrize("case_id, kwargs", PRODIGY, ids=[c[0] for c in PRODIGY])
def test_prodigy_identity(x64, case_id, kwargs):
    kwargs = {"learning_rate": DECAYING, **kwargs}
    history, reports, warned = _monitored_and_plain(optax.contrib.prodigy, kwargs)
    assert not warned
    _assert_param_identity(history, rtol=1e-9)
    grew = _assert_prodigy(history, reports, kwargs, rtol=1e-9)
    assert reports[-1].family == "prodigy"
    if "estim_lr0" not in kwargs:  # the estimate moved: d and d_next were told apart
        assert grew


def test_prodigy_float32():
    kwargs = {"learning_rate": DECAYING, "weight_decay": 0.1}
    history, reports, warned = _monitored_and_plain(optax.contrib.prodigy, kwargs, np.float32)
    assert not warned
    _assert_param_identity(history, rtol=1e-5)
    # The step size computed here in float64: optax's float32 bias correction
    # (1 - b2**t, a cancellation) is 1e-4 off it, the same in lrscope's and in the step.
    _assert_prodigy(history, reports, kwargs, rtol=1e-4)


def test_prodigy_in_a_chain_is_read_by_its_state(x64):
    """A ProdigyState in a transformation you built: read like Adam's, checked."""
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.contrib.prodigy(DECAYING))
    history = _run(lrscope.optax.monitor(tx, learning_rate=DECAYING))
    report = lrscope.inspect(history[-1][-1])
    (group,) = report.groups
    assert report.family == "prodigy" and group.extra["model_error"] < 1e-9
    assert group.extra["d"] == float(history[-1][0].inner[1].estim_lr)


# -- schedule-free -----------------------------------------------------------------------

SCHEDULE_FREE = [
    ("adamw-warmup-decay", optax.contrib.schedule_free_adamw,
     {"learning_rate": 1e-2, "warmup_steps": 3, "weight_decay": 0.1}),
    ("adamw-b1-power", optax.contrib.schedule_free_adamw,
     {"learning_rate": 5e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-4, "weight_lr_power": 1.0}),
    ("sgd-warmup-decay", optax.contrib.schedule_free_sgd,
     {"learning_rate": 1e-2, "warmup_steps": 2, "weight_decay": 0.1}),
    ("sgd", optax.contrib.schedule_free_sgd, {"learning_rate": 1e-2}),
]


def _schedule_free_sequence(kwargs, steps=STEPS):
    """(z-step lr, ckp1, max_lr) of steps 1..steps, computed here from the arguments."""
    peak, warmup = kwargs["learning_rate"], kwargs.get("warmup_steps")
    power = kwargs.get("weight_lr_power", 2.0)

    def lr(count):  # as optax builds and evaluates it (int32 counts)
        if not warmup:
            return peak
        return float(optax.warmup_constant_schedule(0, peak, warmup)(jnp.asarray(count, jnp.int32)))

    out, max_lr, total = [], 0.0, 0.0
    for t in range(1, steps + 1):
        max_lr = max(max_lr, lr(t))
        weight = max_lr**power
        total += weight
        out.append((lr(t - 1), weight / total if total else 0.0, max_lr))
    return out


def _assert_schedule_free(history, reports, kwargs, rtol):
    expected = _schedule_free_sequence(kwargs)
    for (old, before, _, _, new), report, (lr, ckp1, max_lr) in zip(history, reports, expected):
        (group,) = report.groups
        assert not report.empirical and report.family == "schedule_free"
        # Scalars computed here on the host: to a float32 schedule's rounding (the identity
        # on z shows that lr is the one the step used).
        assert group.lr == pytest.approx(lr, rel=max(rtol, 1e-6), abs=1e-300)
        assert group.extra["ckp1"] == pytest.approx(ckp1, rel=max(rtol, 1e-6))
        assert group.extra["max_lr"] == pytest.approx(max_lr, rel=max(rtol, 1e-6))
        assert group.weight_decay_rate == pytest.approx(
            group.lr * (kwargs.get("weight_decay") or 0.0), rel=rtol, abs=1e-300)
        assert group.extra["model_error"] < rtol  # the parameters' (y's) change, predicted
        # The identity on z: z - z_before == -eta * d - decay_rate * y_before.
        names = leaf_names(before)
        z0 = dict(zip(names, leaves(old.inner.z)))
        z1 = dict(zip(names, leaves(new.inner.z)))
        y0 = dict(zip(names, leaves(before)))
        for name, (_, kept) in _kept(new).items():
            modelled = (-np.asarray(kept["eta"], np.float64) * np.asarray(kept["direction"], np.float64)
                        - float(kept["decay_rate"]) * np.asarray(y0[name], np.float64))
            _assert_close(np.asarray(z1[name], np.float64) - np.asarray(z0[name], np.float64),
                          modelled, f"z of {name} at t={report.t}", rtol, _ulp(z0[name], z1[name]))


@pytest.mark.parametrize("case_id, alias, kwargs", SCHEDULE_FREE, ids=[c[0] for c in SCHEDULE_FREE])
def test_schedule_free_identity_on_z(x64, case_id, alias, kwargs):
    history, reports, warned = _monitored_and_plain(alias, kwargs)
    assert not warned
    _assert_schedule_free(history, reports, kwargs, rtol=1e-9)
    if kwargs.get("warmup_steps"):  # the z-step's lr is the schedule at t - 1: 0 at t = 1
        assert reports[0].groups[0].lr == 0 and reports[0].groups[0].step_size == 0
    assert any("parameters hold y" in note for note in reports[-1].notes)


def test_schedule_free_float32():
    kwargs = {"learning_rate": 1e-2, "warmup_steps": 3, "weight_decay": 0.1}
    history, reports, warned = _monitored_and_plain(optax.contrib.schedule_free_adamw, kwargs,
                                                    np.float32)
    assert not warned
    _assert_schedule_free(history, reports, kwargs, rtol=1e-4)


def test_schedule_free_state_dtype_is_detected(x64):
    """z kept in another dtype: not modelled, measured-only, said once."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _run(lrscope.optax.monitor(optax.contrib.schedule_free_adamw, learning_rate=1e-2,
                                             state_dtype=jnp.float32), steps=2)
        report = lrscope.inspect(history[-1][-1])
    warned = [str(w.message) for w in record if str(w.message).startswith("lrscope")]
    assert len(warned) == 1 and "state_dtype" in warned[0] and report.empirical
    assert math.isnan(report.groups[0].step_size)


# -- Muon --------------------------------------------------------------------------------

#: conv: a 3-D tensor, orthogonalized over (reduction 0 and 1, output 2) when told so.
CONV = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
MUON = [
    ("default", {}),
    ("decay-mask", {"weight_decay": 0.1, "adam_weight_decay": 0.05,
                    "weight_decay_mask": lambda p: {k: k != "tall" for k in p}}),
    ("consistent-rms-adam-lr", {"consistent_rms": 0.2, "adam_learning_rate": 3e-3,
                                "adam_b1": 0.8, "adam_eps_root": 1e-10}),
    ("plain-momentum-adaptive", {"nesterov": False, "adaptive": True, "beta": 0.9}),
    ("aol-dion", {"preconditioning": "aol", "ns_coeffs": "dion"}),
    ("spectral-3-steps", {"preconditioning": "spectral", "ns_steps": 3}),
    ("dimension-numbers", {"muon_weight_dimension_numbers": {
        "conv": CONV, "kernel": optax.contrib.MuonDimensionNumbers(), "tall": None, "bias": None,
        "scale": None, "frozen": optax.contrib.MuonDimensionNumbers(1, 0)}}),
]


def _muon_scale(shape, numbers, consistent_rms):
    fan_in = math.prod(shape[a] for a in np.atleast_1d(numbers.reduction_axis))
    fan_out = math.prod(shape[a] for a in np.atleast_1d(numbers.output_axis))
    if consistent_rms is None:
        return math.sqrt(max(1, fan_out / fan_in))
    return math.sqrt(max(fan_in, fan_out)) * consistent_rms


def _muon_numbers(kwargs):
    given = kwargs.get("muon_weight_dimension_numbers")
    if given is not None:
        return given
    return {k: optax.contrib.MuonDimensionNumbers() if len(s) == 2 else None
            for k, s in SHAPES.items()}


def _assert_muon(history, reports, kwargs, rtol):
    numbers = _muon_numbers(kwargs)
    matrices = sorted(k for k, n in numbers.items() if n is not None)
    for (_, _, _, _, new), report in zip(history, reports):
        groups = {g.name: g for g in report.groups}
        muon, adam = groups["muon"], groups["adam"]
        assert not report.empirical and sorted(muon.params) == matrices
        lr = _scheduled(SCHEDULE, report.t)
        assert muon.lr == pytest.approx(lr, rel=max(rtol, 1e-6))  # a float32 schedule
        lr = muon.lr
        for name, param in muon.params.items():  # one eta per matrix: lr * scale
            eta = lr * _muon_scale(SHAPES[name], numbers[name], kwargs.get("consistent_rms"))
            assert param.effective_lr.min == pytest.approx(eta, rel=rtol), name
            assert param.effective_lr.max == pytest.approx(eta, rel=rtol), name
        assert muon.extra["model_error"] < rtol and adam.extra["model_error"] < rtol
        assert report.groups[1].name == "adam"
        adam_plan = next(g for g in new.plan.groups if g.name == "adam")
        assert adam_plan.family == ("nadam" if kwargs.get("nesterov", True) else "adam")
        adam_lr = kwargs.get("adam_learning_rate")
        assert adam.lr == pytest.approx(lr if adam_lr is None else adam_lr, rel=rtol)


@pytest.mark.parametrize("case_id, kwargs", MUON, ids=[c[0] for c in MUON])
def test_muon_identity(x64, case_id, kwargs):
    kwargs = {"learning_rate": SCHEDULE, **kwargs}
    history, reports, warned = _monitored_and_plain(optax.contrib.muon, kwargs)
    assert not warned
    _assert_param_identity(history, rtol=1e-9)
    _assert_muon(history, reports, kwargs, rtol=1e-9)
    decay = {name: float(kept["decay_rate"]) for name, (_, kept) in _kept(history[-1][-1]).items()}
    if case_id == "decay-mask":  # Muon's mask: its matrices only; Adam's decay: all its tensors
        lr = _scheduled(SCHEDULE, STEPS)
        assert decay["tall"] == 0 and decay["kernel"] == pytest.approx(0.1 * lr)
        assert decay["bias"] == pytest.approx(0.05 * lr)


def test_muon_float32():
    kwargs = {"learning_rate": SCHEDULE, "weight_decay": 0.1}
    history, reports, warned = _monitored_and_plain(optax.contrib.muon, kwargs, np.float32)
    assert not warned
    _assert_param_identity(history, rtol=1e-4)
    _assert_muon(history, reports, kwargs, rtol=1e-4)


def test_muon_without_check_reports_the_model(x64):
    """The alias's default (check=False): eta and the norms from the recomputed O."""
    kwargs = {"learning_rate": SCHEDULE, "weight_decay": 0.1}
    history = _run(lrscope.optax.monitor(optax.contrib.muon, **kwargs))
    report = lrscope.inspect(history[-1][-1])
    updates = dict(zip(leaf_names(history[-1][3]), leaves(history[-1][3])))
    for group in report.groups:
        for name, param in group.params.items():
            assert param.update_norm == pytest.approx(float(np.linalg.norm(updates[name])), rel=1e-9)


def test_muon_mu_dtype_is_detected(x64):
    """A momentum rounded after the step used it: the matrices are measured-only."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _run(lrscope.optax.monitor(optax.contrib.muon, learning_rate=1e-2,
                                             mu_dtype=jnp.float32), steps=2)
        report = lrscope.inspect(history[-1][-1])
    warned = [str(w.message) for w in record if str(w.message).startswith("lrscope")]
    assert len(warned) == 1 and "mu_dtype" in warned[0]
    groups = {g.name: g for g in report.groups}
    assert groups["muon"].effective_lr is None and groups["adam"].effective_lr is not None


def test_muon_scale_uses_the_global_matrix_shape_under_sharding():
    """A (16, 64) matrix sharded along its output axis over 4 devices: each shard is
    16 x 16 (scale 1), the matrix's scale is sqrt(64 / 16) = 2, and eta is lr * 2: the
    shapes inside jit are the global ones."""
    script = Path(__file__).with_name("_optax_muon_sharded.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    sharded, unsharded = result["sharded"], result["unsharded"]
    assert result["devices"] == 4 and sharded["shard_shape"] == [16, 16]
    for run in (sharded, unsharded):
        assert run["eta_min"] == run["eta_max"] == pytest.approx(1e-2 * 2, rel=1e-6)
        assert run["model_error"] < 1e-4
    assert sharded["update_norm"] == pytest.approx(unsharded["update_norm"], rel=1e-5)


@pytest.mark.parametrize("alias", [optax.contrib.prodigy, optax.contrib.schedule_free_adamw,
                                   optax.contrib.schedule_free_sgd, optax.contrib.muon])
def test_an_argument_a_new_optax_release_adds_is_detected(alias):
    """An argument lrscope does not know (as a new optax release would add), set to a
    non-default value: no model, a note saying which (the group is measured-only)."""
    from lrscope.optax.model import from_alias

    _, _, h, _, notes = from_alias(alias, {"learning_rate": 1e-2, "new_flag": True})
    assert h is None and any("new_flag=True" in n and "measured-only" in n for n in notes)


def test_injected_prodigy_reads_lr_and_weight_decay_from_the_state(x64):
    """inject_hyperparams(prodigy): the lr and weight decay the step used are read from the
    state; only its betas are assumed (said once), and the estimate's options are not."""
    tx = optax.inject_hyperparams(optax.contrib.prodigy)(learning_rate=0.5, weight_decay=0.1,
                                                         estim_lr0=1e-5)
    report = lrscope.inspect(_run(lrscope.optax.monitor(tx))[-1][-1])
    (group,) = report.groups
    assert group.lr == 0.5 and group.extra["model_error"] < 1e-9
    assert group.weight_decay_rate == pytest.approx(0.1 * group.step_size, rel=1e-12)
    (note,) = report.notes
    assert "b1=0.9, b2=0.999" in note and "estim_lr0" not in note


@pytest.mark.parametrize("alias, kwargs", [
    (optax.contrib.schedule_free_adamw, {"learning_rate": 1e-2, "warmup_steps": 2}),
    (optax.contrib.muon, {"learning_rate": 1e-2}), (optax.contrib.prodigy, {})])
def test_flax_nnx_optimizer(alias, kwargs):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = nnx.Optimizer(model, lrscope.optax.monitor(alias, check=True, **kwargs),
                                  wrt=nnx.Param)
        x = jnp.ones((4, 3))

        @nnx.jit
        def step(model, optimizer):
            optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

        for _ in range(3):
            step(model, optimizer)
        report = lrscope.inspect(optimizer)
    assert not [w for w in record if str(w.message).startswith("lrscope")]
    assert report.t == 3 and not report.empirical
    assert sorted(n for g in report.groups for n in g.params) == ["bias", "kernel"]
    assert all(g.extra["model_error"] < 1e-5 for g in report.groups)
