"""lrscope.optax.monitor against the real Optax optimizers (SPEC §5).

Each case runs real optax steps with a schedule on a scalar, a vector, a matrix and a
tensor that never gets a gradient (frozen), snapshots theta before each step and checks
``theta_after - theta_before == -eta * d - decay_rate * theta_before`` elementwise with
lrscope's eta and d (float64 via ``jax.enable_x64``, scoped to each test), jitted and
not, and that the monitored optimizer's updates are bitwise those of the plain alias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lrscope  # noqa: E402
import lrscope.optax  # noqa: E402

SHAPES = {"dense": {"kernel": (3, 4), "bias": (4,)}, "scale": (), "frozen": (2, 2)}
STEPS = 6
SCHEDULE = optax.linear_schedule(1e-2, 2e-3, 5)

# (id, alias, hyperparameters): the SPEC §2 optimizers and their options.
CASES = [
    ("adam", optax.adam, {}),
    ("adam-eps_root", optax.adam, {"eps_root": 1e-8, "b1": 0.8}),
    ("adamw", optax.adamw, {"weight_decay": 1e-1}),
    ("adamw-mask", optax.adamw, {"weight_decay": 1e-1,
                                 "mask": {"dense": {"kernel": True, "bias": False},
                                          "scale": True, "frozen": True}}),
    ("adam-nesterov", optax.adam, {"nesterov": True}),
    ("nadam", optax.nadam, {}),
    ("nadamw", optax.nadamw, {"weight_decay": 1e-1}),
    ("amsgrad", optax.amsgrad, {}),
    ("radam", optax.radam, {"b2": 0.9}),  # rectified from t = 6 on: both regimes
    ("adamax", optax.adamax, {}),
    ("adamaxw", optax.adamaxw, {"weight_decay": 1e-1}),
    ("adagrad", optax.adagrad, {}),
    ("rmsprop", optax.rmsprop, {}),
    ("rmsprop-centered-momentum", optax.rmsprop, {"centered": True, "momentum": 0.9}),
    ("rmsprop-nesterov-torchlike", optax.rmsprop, {"momentum": 0.5, "nesterov": True,
                                                   "eps_in_sqrt": False, "bias_correction": True}),
    ("sgd", optax.sgd, {}),
    ("sgd-momentum", optax.sgd, {"momentum": 0.9}),
    ("sgd-nesterov", optax.sgd, {"momentum": 0.9, "nesterov": True}),
    ("lion", optax.lion, {"weight_decay": 1e-1}),
    ("adabelief", optax.adabelief, {}),
    ("adabelief-nesterov", optax.adabelief, {"nesterov": True}),
    ("yogi", optax.yogi, {}),
    ("adadelta", optax.adadelta, {"learning_rate": 0.5, "weight_decay": 1e-1}),
    ("adadelta-mask", optax.adadelta, {"learning_rate": 0.5, "weight_decay": 1e-1,
                                       "weight_decay_mask": lambda p: jax.tree.map(
                                           lambda x: x.ndim > 1, p)}),
    ("rprop", optax.rprop, {"learning_rate": 1e-2}),
    ("lamb", optax.lamb, {"weight_decay": 1e-2}),
    ("lamb-mask", optax.lamb, {"weight_decay": 1e-2, "mask": lambda p: jax.tree.map(
        lambda x: x.ndim > 0, p)}),
]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES,
                        is_leaf=lambda s: isinstance(s, tuple))


def _grads(steps, dtype=np.float64):
    """Random gradients, zero for the frozen tensor (it never gets one)."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(steps):
        g = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES,
                         is_leaf=lambda s: isinstance(s, tuple))
        g["frozen"] = jnp.zeros_like(g["frozen"])
        out.append(g)
    return out


def _run(tx, grads, jit=True):
    """Real steps; returns [(theta_before, theta_after, updates, state)] per step."""
    params = _params(grads[0]["scale"].dtype)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    history = []
    for g in grads:
        updates, state = update(g, state, params)
        new = optax.apply_updates(params, updates)
        history.append((params, new, updates, state))
        params = new
    return history


def xla_statistics_only(monkeypatch):
    """Switch off the one-pass statistics (``lrscope.jax.fused``): XLA computes eta."""
    from lrscope.jax import fused

    def unsupported(*args, **kwargs):
        raise fused.Unsupported("switched off by the test")

    monkeypatch.setattr(fused, "statistics", unsupported)


def _kwargs(alias, kwargs):
    if "learning_rate" in kwargs or alias is optax.adadelta:
        return kwargs
    return {"learning_rate": SCHEDULE, **kwargs}


def _assert_identity(history):
    for before, after, _, state in history:
        flat_before = jax.tree_util.tree_leaves(before)
        flat_after = jax.tree_util.tree_leaves(after)
        for group, i, name, kept in [(g, i, n, k) for g in state.plan.groups for i, n, k in
                                     zip(g.leaf_index, g.leaves, state.arrays.get(g.name, ()))]:
            theta0, theta1 = np.asarray(flat_before[i]), np.asarray(flat_after[i])
            modelled = (-np.asarray(kept["eta"]) * np.asarray(kept["direction"])
                        - float(kept["decay_rate"]) * theta0)
            np.testing.assert_allclose(theta1 - theta0, modelled, rtol=1e-9, atol=1e-15,
                                       err_msg=f"{name} at t={int(state.steps)}")


@pytest.mark.parametrize("case_id, alias, kwargs", CASES, ids=[c[0] for c in CASES])
def test_identity_and_bitwise_updates(x64, case_id, alias, kwargs):
    grads = _grads(STEPS)
    scheduled = "learning_rate" not in kwargs and alias is not optax.adadelta
    kwargs = _kwargs(alias, kwargs)
    monitored = _run(lrscope.optax.monitor(alias, check=True, keep_arrays=True, **kwargs), grads)
    plain = _run(alias(**kwargs), grads)
    _assert_identity(monitored)
    for (_, p_mon, u_mon, _), (_, p_plain, u_plain, _) in zip(monitored, plain):
        for a, b in zip(jax.tree_util.tree_leaves((u_mon, p_mon)),
                        jax.tree_util.tree_leaves((u_plain, p_plain))):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    report = lrscope.inspect(monitored[-1][3])
    assert report.t == STEPS and report.framework == "optax" and not report.empirical
    assert report.optimizer == case_id.split("-")[0]
    (group,) = report.groups  # modelled, every tensor in it
    assert sorted(group.params) == ["dense/bias", "dense/kernel", "frozen", "scale"]
    assert group.effective_lr is not None and group.update_magnitude is None
    assert not np.isnan(group.step_size) and not np.isnan(group.weight_decay_rate)
    assert group.extra["model_error"] < 1e-9
    if scheduled:  # optax evaluates the schedule at count - 1
        assert report.groups[0].lr == pytest.approx(float(SCHEDULE(STEPS - 1)), rel=1e-6)


@pytest.mark.parametrize("alias, kwargs", [(optax.adamw, {"weight_decay": 1e-2}),
                                           (optax.radam, {"b2": 0.9}),
                                           (optax.rmsprop, {"momentum": 0.9})])
def test_identity_without_jit(x64, alias, kwargs):
    _assert_identity(_run(lrscope.optax.monitor(alias, keep_arrays=True, **_kwargs(alias, kwargs)),
                          _grads(STEPS), jit=False))


def test_float32_identity_and_bitwise():
    grads = _grads(4, np.float32)
    tx = lrscope.optax.monitor(optax.adam, learning_rate=SCHEDULE, keep_arrays=True)
    monitored = _run(tx, grads)
    plain = _run(optax.adam(SCHEDULE), grads)
    for (before, after, _, state), (_, plain_after, _, _) in zip(monitored, plain):
        group = state.plan.groups[0]
        for i, kept in zip(group.leaf_index, state.arrays["pg0"]):
            theta0 = np.asarray(jax.tree_util.tree_leaves(before)[i], np.float64)
            theta1 = np.asarray(jax.tree_util.tree_leaves(after)[i], np.float64)
            step = -np.asarray(kept["eta"], np.float64) * np.asarray(kept["direction"], np.float64)
            np.testing.assert_allclose(theta1 - theta0, step, rtol=2e-3, atol=2e-7)
        for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(plain_after)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("alias, kwargs", [(optax.adamw, {"weight_decay": 1e-2}),
                                           (optax.rmsprop, {"momentum": 0.9, "centered": True}),
                                           (optax.lion, {})])
def test_fused_train_step_is_bitwise_unchanged(alias, kwargs):
    """float32, gradient + update + apply_updates in one jit: monitoring changes nothing."""

    def train(tx):
        params = _params(np.float32)
        state = tx.init(params)

        @jax.jit
        def step(params, state, x):
            loss = lambda p: jnp.sum(jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
                                     * p["scale"]) + jnp.sum(p["frozen"] * 0)
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for k in range(4):
            params, state = step(params, state, jnp.full((3,), 0.1 * k + 0.3, jnp.float32))
        return params

    kwargs = {"learning_rate": SCHEDULE, **kwargs}
    for a, b in zip(jax.tree_util.tree_leaves(train(lrscope.optax.monitor(alias, **kwargs))),
                    jax.tree_util.tree_leaves(train(alias(**kwargs)))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("alias, kwargs", [(optax.adam, {}), (optax.sgd, {"momentum": 0.9}),
                                           (optax.adafactor, {})])
@pytest.mark.parametrize("every", [1, 2])
def test_state_can_be_donated(alias, kwargs, every):
    """Training loops donate the optimizer state to the jitted step (donate_argnums): no
    two leaves of the monitor's state may share a buffer, at init or after any step."""
    tx = lrscope.optax.monitor(alias, learning_rate=1e-2, every=every, **kwargs)

    def step(params, state):
        grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.01, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    reports = []
    for donate in ((0, 1), ()):
        params = {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.ones((3,), jnp.float32)}
        state = tx.init(params)
        jitted = jax.jit(step, donate_argnums=donate)
        for _ in range(3):
            params, state = jitted(params, state)
        reports.append(lrscope.inspect(state).to_dict())
    assert reports[0]["t"] == 3 and reports[0] == reports[1]


@pytest.mark.parametrize("alias, check", [(optax.adamw, False), (optax.adam, True)])
def test_donated_params_are_not_copied(alias, check):
    """XLA copies a donated argument, on every step, when anything besides the in-place
    update reads it: the statistics read theta after the step instead (the HLO of the
    compiled step has no copy of a parameter-sized array).  (With check=True and an
    update that reads theta, weight decay, the materialised update is such a reader.)"""
    tx = lrscope.optax.monitor(alias, learning_rate=1e-2, every=10, check=check)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones((37, 53), jnp.float32)}
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile().as_text()
    assert "f32[37,53]" in hlo
    assert not [line for line in hlo.splitlines() if "copy(" in line and "f32[37,53]" in line]


@pytest.mark.parametrize("alias, kwargs", [(optax.adamw, {"weight_decay": 1e-2}), (optax.lion, {})])
def test_tensors_measured_in_a_loop_equal_those_measured_alone(x64, alias, kwargs, monkeypatch):
    """On the CPU the tensors of a group are measured block by block in a loop
    (``optax_stats.by_blocks``; blocks of at most 5 elements here: [4], [12], [4, 1]);
    with ``keep_arrays`` (arrays of every shape) each is measured on its own, as on other
    platforms: the same statistics.  (The one-pass statistics of ``lrscope.jax.fused``,
    which need no loop, are switched off: ``tests/test_jax_fused.py`` tests them.)"""
    from lrscope.jax import stats as optax_stats

    monkeypatch.setattr(optax_stats, "BLOCK_ELEMENTS", 5)
    xla_statistics_only(monkeypatch)
    looped, alone = (lrscope.inspect(_run(lrscope.optax.monitor(
        alias, learning_rate=SCHEDULE, keep_arrays=keep, **kwargs), _grads(3))[-1][3]).to_dict()
        for keep in (False, True))
    assert len(looped["groups"][0]["params"]) == 4
    assert looped == alone


def test_a_step_holds_the_temporaries_of_one_block_of_tensors():
    """XLA's temporary buffer of a monitored step, allocated on every step, holds the
    temporaries (eta, bucket keys) of one block of tensors (``optax_stats.blocks``), not
    those of every tensor: on the CPU the blocks are measured in a loop (13 MiB here);
    written out, XLA's CPU scheduler runs all the measurements side by side and allocates
    them all at once (51 MiB)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the loop is the CPU's")
    from lrscope.jax import stats as optax_stats

    tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-3, every=10)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {f"w{i}": jnp.ones((500, 1000), jnp.float32) for i in range(12)}  # blocks of 2
    compiled = jax.jit(step).lower(params, tx.init(params), params).compile()
    one_block = optax_stats.BLOCK_ELEMENTS * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * one_block


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("special", [[np.inf, -np.inf, np.nan], []], ids=["not-all-finite", "finite"])
def test_compiled_statistics_equal_the_traced_ones(x64, dtype, special):
    """On one CPU device the bucket counts, finite extremes and sums and the eps-dominated
    count come from ``lrscope.jax.kernel`` (numba, an XLA FFI call); they equal the jnp ones
    (scatter-add and XLA's masked reductions): counts identically, sums to rounding, with zeros,
    negatives and subnormals among the values, and infinities and NaNs (the kernel's masked
    reductions) or not (its plain ones)."""
    from lrscope.jax import kernel
    from lrscope.jax import stats as optax_stats

    assert kernel.available()
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.lognormal(-8, 3, 5000), -rng.lognormal(0, 1, 50),
                             [0.0, -0.0, 1e-40, 1e-310, 3e18, -1e-42], special])
    values = jnp.asarray(values, dtype).reshape(1, -1)
    counts, (low, high, total, squares), above = jax.jit(kernel.bucket_stats)(values, values > 1e-4)
    np.testing.assert_array_equal(counts, optax_stats._buckets(values))
    finite = np.asarray(values)[np.isfinite(np.asarray(values))].astype(np.float64)
    assert (low, high) == (finite.min(), finite.max())
    assert float(total) == pytest.approx(finite.sum(), rel=1e-6)
    assert float(squares) == pytest.approx(np.square(finite).sum(), rel=1e-6)
    assert above == np.sum(np.asarray(values) > 1e-4)
    nothing_finite = jax.jit(kernel.bucket_stats)(jnp.full((3,), jnp.nan, dtype))[1]
    assert nothing_finite.tolist() == [np.inf, -np.inf, 0.0, 0.0]


def test_compiled_statistics_that_fail_their_check_fall_back_with_one_warning(monkeypatch):
    """A jax whose FFI the compiled handlers do not match (here: counts that differ, or a
    call that raises) gets the jnp statistics and one warning, never wrong counts."""
    from lrscope.jax import kernel

    real = kernel.bucket_stats

    def wrong(values, mask=None):
        counts, reduced, above = real(values, mask)
        return counts.at[0].add(1), reduced, above

    def raising(values, mask=None):
        raise RuntimeError("no such FFI target")

    for broken, said in ((wrong, "differ from numpy"), (raising, "no such FFI target")):
        kernel._checked.cache_clear()
        monkeypatch.setattr(kernel, "bucket_stats", broken)
        with pytest.warns(RuntimeWarning, match=said):
            assert not kernel.available()
        monkeypatch.undo()
    kernel._checked.cache_clear()
    assert kernel.available()


def test_distribution_matches_numpy(x64):
    params = {"big": jnp.asarray(np.random.default_rng(2).normal(size=(50, 60)))}
    rng = np.random.default_rng(3)
    tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-3, eps=1e-3, keep_arrays=True)
    state = tx.init(params)
    for _ in range(3):
        g = {"big": jnp.asarray(rng.normal(size=(50, 60)) * rng.lognormal(size=(50, 60)) * 1e-3)}
        updates, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, updates)
    eta = np.asarray(state.arrays["pg0"][0]["eta"])
    dist = lrscope.inspect(state).groups[0].params["big"].effective_lr
    assert dist.count == eta.size and dist.min == eta.min() and dist.max == eta.max()
    assert dist.mean == pytest.approx(eta.mean(), rel=1e-12)
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert dist.quantile(q) == pytest.approx(np.quantile(eta, q), rel=0.01)
    nu_hat = np.asarray(state.inner[0].nu["big"]) / (1 - 0.999**3)
    assert dist.eps_dominated_count == int(np.sum(np.sqrt(nu_hat) < 1e-3)) > 0


def test_per_group_statistics_equal_the_merged_per_tensor_ones(x64):
    kwargs = {"learning_rate": SCHEDULE, "weight_decay": 1e-2}
    per_tensor = lrscope.inspect(_run(lrscope.optax.monitor(optax.adamw, check=True, **kwargs),
                                      _grads(2))[-1][3]).groups[0]
    state = _run(lrscope.optax.monitor(optax.adamw, check=True, per_param=False, **kwargs), _grads(2))[-1][3]
    assert state.stats["pg0"].min.shape == (1,)
    per_group = lrscope.inspect(state).groups[0]
    assert per_group.params == {}
    assert per_group.effective_lr.sketch == per_tensor.effective_lr.sketch
    assert per_group.effective_lr.eps_dominated_count == per_tensor.effective_lr.eps_dominated_count
    assert per_group.update_norm == pytest.approx(per_tensor.update_norm, rel=1e-12)
    assert per_group.param_norm == pytest.approx(per_tensor.param_norm, rel=1e-12)
    assert per_group.extra["model_error"] == per_tensor.extra["model_error"]


def test_every_keeps_scalars_each_step(x64):
    tx = lrscope.optax.monitor(optax.adam, learning_rate=SCHEDULE, every=3, keep_arrays=True)
    seen = []
    for _, _, _, state in _run(tx, _grads(5)):
        report = lrscope.inspect(state)
        seen.append((report.t, report.groups[0].effective_lr is not None))
        assert report.groups[0].lr == pytest.approx(float(SCHEDULE(report.t - 1)))
    assert seen == [(1, True), (2, False), (3, False), (4, True), (5, False)]


@pytest.mark.parametrize("alias, kwargs", [(optax.adamw, {"weight_decay": 1e-1}),
                                           (optax.adadelta, {"weight_decay": 1e-1})])
def test_without_check_the_norms_come_from_the_model(x64, alias, kwargs):
    kwargs = _kwargs(alias, kwargs)
    checked = _run(lrscope.optax.monitor(alias, check=True, keep_arrays=True, **kwargs), _grads(3))
    unchecked = _run(lrscope.optax.monitor(alias, check=False, every=2, keep_arrays=True,
                                           **kwargs), _grads(3))
    _assert_identity(unchecked[::2])  # steps 1 and 3 carry distributions
    for (_, a, _, s_checked), (_, b, _, s_unchecked) in zip(checked[::2], unchecked[::2]):
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                        jax.tree_util.tree_leaves(b)))
        g1, g2 = lrscope.inspect(s_checked).groups[0], lrscope.inspect(s_unchecked).groups[0]
        assert "model_error" not in g2.extra
        assert g2.update_norm == pytest.approx(g1.update_norm, rel=1e-12)
        assert g2.param_norm == pytest.approx(g1.param_norm, rel=1e-12)
        assert g2.effective_lr.sketch == g1.effective_lr.sketch


def test_chain_inject_hyperparams_clip_and_multi_transform(x64):
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE, b1=0.8)
    tx = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(1.0), inner),
                                "frozen": optax.set_to_zero()},
                               {"dense": {"kernel": "train", "bias": "train"}, "scale": "train",
                                "frozen": "frozen"})
    with pytest.warns(RuntimeWarning, match="group frozen"):  # set_to_zero keeps no state
        history = _run(lrscope.optax.monitor(tx, keep_arrays=True), _grads(STEPS))
    report = lrscope.inspect(history[-1][3])
    group, frozen = report.groups
    assert group.name == "train" and sorted(group.params) == ["dense/bias", "dense/kernel", "scale"]
    assert frozen.name == "frozen" and list(frozen.params) == ["frozen"]  # measured-only
    assert frozen.effective_lr is None and frozen.update_magnitude.max == 0
    assert group.lr == pytest.approx(float(SCHEDULE(STEPS - 1)))  # read from the injected state
    assert group.extra["model_error"] < 1e-9  # b1 = 0.8 read from the injected state too
    (note,) = [n for n in report.notes if "assumed optax's defaults" in n]
    assert "b1" not in note and "eps" not in note and "weight_decay=0.0" in note
    _assert_identity(history)


def test_multi_transform_groups_with_their_own_hyperparameters(x64):
    labels = {"dense": {"kernel": "body", "bias": "body"}, "scale": "head", "frozen": "body"}
    tx = optax.multi_transform({"body": optax.adam(1e-3, b1=0.8),
                                "head": optax.sgd(1e-2, momentum=0.9)}, labels)
    monitored = lrscope.optax.monitor(tx, learning_rate=1e-3, b1=0.8, keep_arrays=True,
                                      groups={"head": {"learning_rate": 1e-2, "momentum": 0.9}})
    history = _run(monitored, _grads(3))
    _assert_identity(history)
    report = lrscope.inspect(history[-1][3])
    body, head = report.groups
    assert (body.name, head.name) == ("body", "head") and report.family is None
    assert sorted(body.params) == ["dense/bias", "dense/kernel", "frozen"]
    assert list(head.params) == ["scale"] and head.lr == pytest.approx(1e-2)
    assert body.extra["model_error"] < 1e-9 and head.extra["model_error"] < 1e-9
    with pytest.raises(ValueError, match="groups="):
        lrscope.optax.monitor(tx, groups={"tail": {}}).init(_params())


def test_inject_hyperparams_alias_with_weight_decay(x64):
    tx = lrscope.optax.monitor(optax.inject_hyperparams(optax.adamw), learning_rate=SCHEDULE,
                               weight_decay=1e-1, keep_arrays=True)
    history = _run(tx, _grads(3))
    _assert_identity(history)
    group = lrscope.inspect(history[-1][3]).groups[0]
    assert group.weight_decay_rate == pytest.approx(float(SCHEDULE(2)) * 1e-1)


@pytest.mark.parametrize("alias, kwargs", [(optax.adamw, {}), (optax.adamaxw, {"family": "adamax"}),
                                           (optax.lion, {}), (optax.lamb, {"family": "lamb"})],
                         ids=["adamw", "adamaxw", "lion", "lamb"])
def test_injected_weight_decay_is_read_from_the_state(x64, alias, kwargs):
    """monitor(optax.inject_hyperparams(optax.adamw)(..., weight_decay=...)): the idiom for
    logging a schedule injects the weight decay too; it was assumed 0 (a model-check note,
    weight_decay_rate 0).  (Adamax and Lamb keep Adam's state: family= tells them apart.)"""
    tx = optax.inject_hyperparams(alias)(learning_rate=SCHEDULE, weight_decay=1e-1)
    history = _run(lrscope.optax.monitor(tx, keep_arrays=True, **kwargs), _grads(3))
    _assert_identity(history)
    report = lrscope.inspect(history[-1][3])
    group = report.groups[0]
    assert group.extra["model_error"] < 1e-9 and not report.notes
    assert group.weight_decay_rate == pytest.approx(float(SCHEDULE(2)) * 1e-1)


def test_an_injected_momentum_is_named_and_can_be_passed(x64):
    """SGD's momentum is injected too, but its formula branches on it, so lrscope cannot read
    it as a traced value: the note says it was injected and how to pass it."""
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="its decay is injected"):  # at init
        report = lrscope.inspect(_run(lrscope.optax.monitor(tx), _grads(2))[-1][3])
    assert report.empirical
    (note,) = report.notes
    assert "its decay is injected" in note and "pass momentum= to lrscope.optax.monitor" in note
    history = _run(lrscope.optax.monitor(tx, momentum=0.9, keep_arrays=True), _grads(3))
    _assert_identity(history)
    assert lrscope.inspect(history[-1][3]).groups[0].extra["model_error"] < 1e-9


@pytest.mark.parametrize("transforms, kwargs, family", [
    ([optax.trace(decay=0.9)], {"momentum": 0.9}, "sgd"),
    ([optax.scale_by_rms(decay=0.8)], {"decay": 0.8}, "rmsprop"),
    ([optax.scale_by_stddev()], {}, "rmsprop"),
    ([optax.scale_by_amsgrad()], {}, "amsgrad"),
    ([optax.scale_by_belief()], {}, "adabelief"),
    ([optax.scale_by_adam(nesterov=True)], {"family": "nadam"}, "nadam"),
    ([optax.add_decayed_weights(1e-1), optax.scale_by_adadelta()], {"weight_decay": 1e-1},
     "adadelta"),
], ids=["trace", "rms", "stddev", "amsgrad", "belief", "adam-nesterov", "adadelta"])
def test_hand_built_chains_are_read_by_structure(x64, transforms, kwargs, family):
    tx = optax.chain(optax.clip(10.0), *transforms, optax.scale_by_learning_rate(SCHEDULE))
    history = _run(lrscope.optax.monitor(tx, learning_rate=SCHEDULE, keep_arrays=True, **kwargs),
                   _grads(4))
    _assert_identity(history)
    report = lrscope.inspect(history[-1][3])
    assert report.family == family and report.groups[0].extra["model_error"] < 1e-9
    assert not report.empirical and report.groups[0].effective_lr is not None  # still modelled


def test_chain_with_wrong_hyperparameters_or_unknown_lr_is_measured_only(x64):
    """Assumed defaults the model check refutes (b1), or an unknown lr: the group is
    reported measured-only, with a warning and a note saying why."""
    tx = optax.chain(optax.scale_by_adam(b1=0.5), optax.scale_by_learning_rate(1e-2))
    history = _run(lrscope.optax.monitor(tx, learning_rate=1e-2), _grads(3))
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        report = lrscope.inspect(history[-1][3])
    group = report.groups[0]
    assert group.extra["model_error"] > 1e-3 and report.empirical
    assert group.effective_lr is None and group.update_magnitude.count == 21
    assert any("does NOT reproduce" in note for note in report.notes)
    history = _run(lrscope.optax.monitor(tx), _grads(2))
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        report = lrscope.inspect(history[-1][3])
    assert np.isnan(report.groups[0].lr) and report.groups[0].effective_lr is None
    assert any("pass learning_rate=" in note for note in report.notes)
    assert any("without its learning rate" in note for note in report.notes)


def test_adadelta_default_lr_ascends_and_is_reported(x64):
    history = _run(lrscope.optax.monitor(optax.adadelta, keep_arrays=True), _grads(3))
    _assert_identity(history)
    report = lrscope.inspect(history[-1][3])
    assert report.groups[0].lr == -1 and report.groups[0].effective_lr.max < 0
    assert any("ASCENDS" in note for note in report.notes)
    # It really ascends: the update has the sign of the gradient.
    _, _, updates, _ = history[0]
    grads = _grads(1)[0]
    assert np.all(np.asarray(updates["dense"]["kernel"]) * np.asarray(grads["dense"]["kernel"]) > 0)


def test_rprop_is_one_step_late_and_reported(x64):
    tx = lrscope.optax.monitor(optax.rprop, learning_rate=1e-2, keep_arrays=True)
    history = _run(tx, _grads(4))
    _assert_identity(history)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(history[0][2]))
    # Step 2 moves by the first gradient's sign (kept where the sign did not flip).
    g1, g2 = (np.asarray(g["dense"]["kernel"]) for g in _grads(2))
    expected = np.where(g1 * g2 < 0, 0.0, -1e-2 * np.sign(g1))
    np.testing.assert_allclose(np.asarray(history[1][2]["dense"]["kernel"]), expected)
    assert any("one step late" in note for note in lrscope.inspect(history[0][3]).notes)


@pytest.mark.parametrize("alias, kwargs, what", [
    (optax.amsgrad, {"learning_rate": 1e-2, "bias_correction_nu": False}, "bias_correction_nu"),
    (optax.radam, {"learning_rate": 1e-2, "nesterov": True}, "nesterov=True"),
    (optax.adan, {"learning_rate": 1e-2}, "no optimizer state lrscope can read"),
])
def test_unmodelled_options_fall_back_to_empirical(x64, alias, kwargs, what):
    with pytest.warns(RuntimeWarning, match=what) as record:
        tx = lrscope.optax.monitor(alias, **kwargs)
        history = _run(tx, _grads(2))
    assert {w.filename for w in record} == {__file__}  # tx.init's caller, not lrscope
    report = lrscope.inspect(history[-1][3])
    assert report.empirical and report.groups[0].effective_lr is None
    kernel = report.groups[0].params["dense/kernel"]
    real = np.abs(np.asarray(history[-1][2]["dense"]["kernel"]))
    assert kernel.update_magnitude.max == real.max()
    assert kernel.update_norm == pytest.approx(np.linalg.norm(real))


@pytest.mark.parametrize("kwargs", [
    {},
    # The EMA's state is float32 by default; float64 keeps it exact like the update.
    {"learning_rate": SCHEDULE, "momentum": 0.9, "weight_decay_rate": 1e-2,
     "dtype_momentum": jnp.float64},
    {"learning_rate": 1e-2, "factored": False, "clipping_threshold": None,
     "multiply_by_parameter_scale": False},
], ids=["defaults", "momentum-decay", "plain"])
def test_adafactor_factored_and_full(x64, kwargs):
    rng = np.random.default_rng(5)
    shapes = {"factored": (130, 128), "vector": (7,), "small": (3, 4)}
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
    tx = lrscope.optax.monitor(optax.adafactor, check=True, keep_arrays=True, **kwargs)
    state = tx.init(params)
    for _ in range(3):
        grads = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
        updates, state = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, updates)
        group = state.plan.groups[0]
        for name, kept in zip(group.leaves, state.arrays["pg0"]):
            np.testing.assert_allclose(
                np.asarray(new[name] - params[name]),
                -np.asarray(kept["eta"]) * np.asarray(kept["direction"])
                - float(kept["decay_rate"]) * np.asarray(params[name]), rtol=1e-9, atol=1e-15)
        params = new
    report = lrscope.inspect(state)
    assert report.groups[0].extra["model_error"] < 1e-9 and not report.empirical


def test_log_to_sinks_and_watch(x64, tmp_path):
    class Collect:
        def __init__(self):
            self.reports = []

        def write(self, report):
            self.reports.append(report)

        def close(self):
            pass

    sink = Collect()
    history = _run(lrscope.optax.monitor(optax.sgd, learning_rate=0.1), _grads(2))
    lrscope.optax.log(history[0][3], [sink])
    with lrscope.watch(history[0][3], sinks=[sink]) as mon:
        for *_, state in history:
            mon.log(state)
            mon.log(state)  # logging the same step twice writes it once
    assert [r.t for r in sink.reports] == [1, 1, 2]
    with pytest.raises(ValueError, match="pass every= to lrscope.optax.monitor"):
        lrscope.watch(history[0][3], every=10, sinks=[sink])
    with pytest.raises(TypeError, match="create the monitor once"):
        lrscope.optax.log(history[0][3], str(tmp_path))
    assert sink.reports[-1].scalars()["lr-sgd/pg0/lr"] == pytest.approx(0.1)
    with lrscope.watch(history[0][3], sinks=[sink], name="actor") as mon:  # tags lr-<name>
        report = mon.log(history[-1][3])
    assert report.name == "actor" and report.scalars()["lr-actor/pg0/lr"] == pytest.approx(0.1)


def test_not_a_monitored_state_is_refused():
    state = optax.adam(1e-3).init({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="lrscope.optax.monitor"):
        lrscope.optax.inspect(state)
    with pytest.raises(ValueError, match="no optimizer step"):
        tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-3)
        lrscope.inspect(tx.init({"w": jnp.ones(2)}))
    # lrscope.inspect/watch on near misses say what to pass instead.
    with pytest.raises(TypeError, match="this Optax state carries no lrscope statistics"):
        lrscope.inspect(state)
    with pytest.raises(TypeError, match="this Optax state carries no lrscope statistics"):
        lrscope.watch(state[0])  # a bare ScaleByAdamState
    with pytest.raises(TypeError, match="the Optax optimizer itself.*pass its state"):
        lrscope.watch(optax.adam(1e-3))


def test_sharded_and_pmapped_statistics_equal_unsharded():
    script = Path(__file__).with_name("_optax_sharded.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["sharded"]
    sharded, unsharded = result["sharded_report"], result["unsharded_report"]
    # Bucket counts, extremes and eps counts are exact; float32 sums differ by the
    # order of the sharded reduction only.
    rounded = {"mean", "update_norm", "param_norm"}
    for name in ("kernel", "bias"):
        for key, value in sharded[name].items():
            expected = unsharded[name][key]
            assert value == (pytest.approx(expected, rel=1e-5) if key in rounded else expected), key
    # Under jax.pmap every leaf has a device axis: replica 0 is reported, and said.
    pmapped = result["pmap_report"]
    assert any("replicated over 4 devices" in note for note in result["pmap_notes"])
    for name in ("kernel", "bias"):
        for key, value in pmapped[name].items():
            expected = unsharded[name][key]
            assert value == (pytest.approx(expected, rel=1e-5) if key in rounded else expected), key
    assert sharded["lr"] == unsharded["lr"] and sharded["step_size"] == unsharded["step_size"]


def test_flax_nnx_optimizer(x64):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    optimizer = nnx.Optimizer(model, lrscope.optax.monitor(optax.adamw, check=True, learning_rate=1e-2),
                              wrt=nnx.Param)
    x = jnp.ones((4, 3))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(2):
        step(model, optimizer)
    report = lrscope.inspect(optimizer)
    assert report.t == 2 and sorted(report.groups[0].params) == ["bias", "kernel"]
    assert report.groups[0].extra["model_error"] < 1e-9


@pytest.mark.parametrize("alias", [optax.adam, optax.sgd])
def test_complex_parameters(x64, alias):
    rng = np.random.default_rng(4)
    params = {"z": jnp.asarray(rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2)))}
    tx = lrscope.optax.monitor(alias, check=True, learning_rate=1e-2, keep_arrays=True)
    state = tx.init(params)
    for _ in range(3):
        grads = {"z": jnp.asarray(rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2)))}
        updates, state = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, updates)
        kept = state.arrays["pg0"][0]
        np.testing.assert_allclose(np.asarray(new["z"] - params["z"]),
                                   -np.asarray(kept["eta"]) * np.asarray(kept["direction"]),
                                   rtol=1e-9, atol=1e-15)
        params = new
    assert lrscope.inspect(state).groups[0].extra["model_error"] < 1e-9


def test_multisteps_and_apply_if_finite_count_real_steps_only(x64):
    """Gradient accumulation and skipped non-finite steps: t counts the steps taken."""
    accumulate = optax.MultiSteps(lrscope.optax.monitor(optax.adam, learning_rate=SCHEDULE),
                                  every_k_schedule=2)
    history = _run(accumulate, _grads(4))
    report = lrscope.inspect(history[-1][3])
    assert report.t == 2 and report.groups[0].lr == pytest.approx(float(SCHEDULE(1)))

    guarded = optax.apply_if_finite(lrscope.optax.monitor(optax.adam, learning_rate=SCHEDULE), 3)
    grads = _grads(3)
    grads[1] = jax.tree.map(lambda g: g * jnp.nan, grads[1])
    history = _run(guarded, grads)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(history[1][0]),
                                                    jax.tree_util.tree_leaves(history[1][1])))
    assert lrscope.inspect(history[-1][3]).t == 2


def test_logging_every_mini_step_of_multisteps(tmp_path):
    """mon.log on every mini-step of gradient accumulation: nothing before the first real
    step (it used to raise there and stop training), then one record per real step."""
    accumulate = optax.MultiSteps(lrscope.optax.monitor(optax.adam, learning_rate=SCHEDULE),
                                  every_k_schedule=2)
    states = [state for *_, state in _run(accumulate, _grads(5))]
    mon = lrscope.watch(states[-1], log_dir=tmp_path)
    logged = [mon.log(state) for state in states]
    mon.close()
    assert logged[0] is None

    class Collect:  # any sink
        reports: list = []

        def write(self, report):
            self.reports.append(report.t)

        def close(self):
            pass

    assert [lrscope.optax.log(state, [Collect()]) is None for state in states[:2]] == [True, False]
    assert Collect.reports == [1]
    assert [r.t for r in logged[1:]] == [1, 1, 2, 2]
    records = [json.loads(line) for line in (tmp_path / "lrscope.jsonl").read_text().splitlines()]
    assert [r["t"] for r in records] == [1, 2]
    with pytest.raises(ValueError, match="no optimizer step has been taken yet"):
        lrscope.inspect(states[0])


def test_bfloat16_parameters_pass_the_model_check():
    params = {"w": jnp.asarray(np.random.default_rng(6).normal(size=(8, 8)), jnp.bfloat16)}
    tx = lrscope.optax.monitor(optax.adamw, check=True, learning_rate=1e-2, weight_decay=1e-2)
    state = tx.init(params)
    for k in range(3):
        grads = jax.tree.map(lambda p: jnp.cos(p * (k + 1)), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    report = lrscope.inspect(state)
    assert not any("does NOT reproduce" in note for note in report.notes)
    assert report.groups[0].effective_lr.count == 64
