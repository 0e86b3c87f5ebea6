"""Keras 3.15's newer optimizers against their real steps (SPEC §5, §6): Ftrl, Muon,
ScheduleFreeAdamW and MultiOptimizer, on the backend KERAS_BACKEND selects (the Makefile
runs this file under tensorflow, jax and torch).

Variables are float64 where Keras allows it: not on JAX without x64, and not for Muon on
TensorFlow, whose ``lr_adjust`` multiplies a float64 update by a float32 factor and fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import CollectSink

keras = pytest.importorskip("keras")

import lrscope  # noqa: E402
import lrscope.keras  # noqa: E402
from keras import ops  # noqa: E402
from lrscope.keras.multi import reader_for  # noqa: E402

_O = keras.optimizers
BACKEND = keras.backend.backend()
if not all(hasattr(_O, name) for name in ("Muon", "ScheduleFreeAdamW", "MultiOptimizer")):
    pytest.skip("Muon, ScheduleFreeAdamW and MultiOptimizer need keras >= 3.15", allow_module_level=True)
#: Keras rounds betas through float32 for the bias corrections on TensorFlow.
BETA_ROUNDING = 1e-4
SHAPES = {"scalar": (), "vector": (5,), "matrix": (5, 3), "wide": (3, 7), "embedding": (6, 2)}


def _dtype(family: str = "") -> str:
    return "float32" if BACKEND == "jax" or (family == "muon" and BACKEND == "tensorflow") else "float64"


def _tolerances(dtype: str) -> tuple[float, float]:
    """(rtol, atol relative to the largest |theta|) of one step's identity."""
    return (1e-5, 4e-7) if dtype == "float32" else (1e-9, 1e-14)


def _schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    # Halving every step: a schedule read at the wrong index breaks the identity.
    return _O.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)


def _np(value) -> np.ndarray:
    return np.asarray(value if isinstance(value, (int, float)) else ops.convert_to_numpy(value), np.float64)


def _variables(rng: np.random.Generator, dtype: str) -> list:
    return [keras.Variable(rng.normal(size=shape), dtype=dtype, name=name) for name, shape in SHAPES.items()]


def _grads(rng: np.random.Generator, variables: list, tiny: bool = True) -> list:
    """Gradients of mixed magnitudes (eps dominates somewhere), or of order 1."""
    return [ops.convert_to_tensor(rng.normal(size=v.shape) * (10.0 ** rng.integers(-9, 1, size=v.shape) if tiny else 1),
                                  dtype=v.dtype) for v in variables]


def _values(variables: list) -> dict[str, np.ndarray]:
    return {v.path: _np(v) for v in variables}


def _assert_identity(before: np.ndarray, after: np.ndarray, el, dtype: str) -> None:
    """theta_after - theta_before == -eta * d - decay * theta_before (or el.delta, the
    parameters' own change where eta and d describe another sequence)."""
    rtol, atol = _tolerances(dtype)
    if el.delta is not None:
        predicted = _np(el.delta)
    else:
        predicted = -_np(el.eta) * _np(el.direction) - _np(el.decay_rate) * before
    np.testing.assert_allclose(after - before, predicted, rtol=rtol, atol=atol * max(1.0, float(np.abs(before).max())))


def _realized_norm(before: dict, after: dict, paths) -> float:
    return math.sqrt(sum(float(((after[p] - before[p]) ** 2).sum()) for p in paths))


def _assert_update_norm(got: float, before: dict, after: dict, paths, dtype: str) -> None:
    """``got`` is ||theta_after - theta_before|| over ``paths``, up to the rounding of theta
    (in float32 an update of 1e-4 of theta is known to about 1e-3 of itself)."""
    paths = list(paths)
    rounding = float(np.finfo(dtype).eps) * math.sqrt(sum(after[p].size for p in paths)) * max(
        1.0, max(float(np.abs(after[p]).max(initial=0)) for p in paths))
    assert got == pytest.approx(_realized_norm(before, after, paths), rel=1e-8, abs=4 * rounding)


# --- Ftrl -------------------------------------------------------------------------------------

FTRL = {
    "ftrl": lambda: _O.Ftrl(0.5),
    "ftrl_l2_beta_power": lambda: _O.Ftrl(0.5, learning_rate_power=-0.3, l2_regularization_strength=0.1,
                                          beta=0.5, initial_accumulator_value=0.2),
    "ftrl_shrinkage": lambda: _O.Ftrl(0.5, l2_shrinkage_regularization_strength=0.05),
    "ftrl_wd": lambda: _O.Ftrl(0.5, weight_decay=0.1),
    "ftrl_fixed_lr": lambda: _O.Ftrl(0.5, learning_rate_power=0.0),
    "ftrl_l1_schedule": lambda: _O.Ftrl(_schedule(), l1_regularization_strength=0.05),
}


@pytest.mark.parametrize("case", sorted(FTRL))
def test_ftrl_eta_from_the_accumulator(case: str) -> None:
    """eta = 1 / q from Keras' accumulator after the step; d measured from the copy taken
    before it (the identity then holds by construction: checked for the decay and the
    plumbing); where FTRL is online gradient descent (l1 = 0, constant lr, no decoupled
    decay, which z partly undoes, from step 2) d is the gradient (plus 2 * shrinkage *
    theta), which checks eta against the real step."""
    dtype = _dtype()
    rng = np.random.default_rng(0)
    trained = _variables(rng, dtype)
    optimizer = FTRL[case]()
    optimizer.build(trained)
    ogd = (optimizer.l1_regularization_strength == 0 and not optimizer.weight_decay
           and not isinstance(optimizer._learning_rate, _O.schedules.LearningRateSchedule))
    for step in range(1, 5):
        grads = _grads(rng, trained, tiny=False)
        recorded = reader_for(optimizer).record_before()
        before = _values(trained)
        optimizer.apply(grads, trained)
        after = _values(trained)
        moved = dict(lrscope.keras.elementwise(optimizer, recorded=recorded))
        lr = float(ops.convert_to_numpy(optimizer.learning_rate if not isinstance(
            optimizer._learning_rate, _O.schedules.LearningRateSchedule) else optimizer._learning_rate(step - 1)))
        for v, g, n in zip(trained, grads, optimizer._accumulators):
            el = moved[v.path]
            _assert_identity(before[v.path], after[v.path], el, dtype)
            quadratic = _np(n) ** (-optimizer.learning_rate_power) / lr + 2 * (
                optimizer.l2_regularization_strength + optimizer.beta / (2 * lr))
            np.testing.assert_allclose(_np(el.eta), 1 / quadratic, rtol=1e-6)
            if ogd and step > 1:
                np.testing.assert_allclose(
                    _np(el.direction), _np(g) + 2 * optimizer.l2_shrinkage_regularization_strength * before[v.path],
                    rtol=1e-4 if dtype == "float32" else 1e-7, atol=1e-4 if dtype == "float32" else 1e-9)
        report = reader_for(optimizer).report(recorded=recorded)
        group = report.groups[0]
        assert report.t == step and report.family == "ftrl" and group.lr == pytest.approx(lr, rel=1e-7)
        assert group.step_size == group.lr
        _assert_update_norm(group.update_norm, before, after, before, dtype)


def test_ftrl_without_a_copy_reports_eta_and_says_what_is_missing() -> None:
    rng = np.random.default_rng(1)
    trained = _variables(rng, _dtype())
    optimizer = _O.Ftrl(0.5)
    optimizer.apply(_grads(rng, trained), trained)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].effective_lr.count == sum(int(np.prod(s)) for s in SHAPES.values())
    assert report.groups[0].update_norm is None
    assert any("copy of the variables taken before the step" in n for n in report.notes)


# --- Muon -------------------------------------------------------------------------------------

MUON = {
    "muon": lambda: _O.Muon(_schedule()),
    "muon_plain_ratio_wd": lambda: _O.Muon(_schedule(), nesterov=False, adam_lr_ratio=0.1, weight_decay=0.05,
                                           adam_weight_decay=0.02),
    "muon_no_rms_excluded": lambda: _O.Muon(1e-2, rms_rate=None, exclude_layers=["wide"], exclude_embeddings=False,
                                            weight_decay=None, adam_weight_decay=None),
}
#: The variables each case's step gives the Muon rule (the others take its Adam rule).
MUON_PATH = {"muon": {"matrix", "wide"}, "muon_plain_ratio_wd": {"matrix", "wide"},
             "muon_no_rms_excluded": {"matrix", "embedding"}}


def _adjusted(lr: float, shape: tuple, rms_rate) -> float:
    return lr if rms_rate is None else lr * float(np.float32(math.sqrt(max(shape)))) * rms_rate


@pytest.mark.parametrize("case", sorted(MUON))
def test_muon_identity_on_real_steps(case: str) -> None:
    """Both rules of Keras Muon satisfy the identity: the Muon rule with eta the adjusted lr
    of the matrix and d its orthogonalized update, computed with Keras' own Newton-Schulz
    function (grads given, or without Nesterov) and measured from a copy taken before the
    step (Nesterov, no grads): the two agree; the Adam rule as Keras Adam with
    ``lr * adam_lr_ratio``; both decays on the unscaled lr.  Two groups, "muon" and "adam"."""
    dtype = _dtype("muon")
    rng = np.random.default_rng(2)
    trained = _variables(rng, dtype)
    optimizer = MUON[case]()
    optimizer.build(trained)
    for step in range(1, 5):
        grads = _grads(rng, trained)
        recorded = reader_for(optimizer).record_before()
        before = _values(trained)
        optimizer.apply(grads, trained)
        after = _values(trained)
        computed = dict(lrscope.keras.elementwise(optimizer, grads=grads, variables=trained))
        measured = dict(lrscope.keras.elementwise(optimizer, recorded=recorded))
        lr = 1e-2 * 0.5 ** (step - 1) if case != "muon_no_rms_excluded" else 1e-2
        for v in trained:
            el = computed[v.path]
            _assert_identity(before[v.path], after[v.path], el, dtype)
            if v.name in MUON_PATH[case]:
                eta = _adjusted(float(np.float32(lr)), tuple(v.shape), optimizer.rms_rate)
                assert float(el.eta) == pytest.approx(eta, rel=1e-6)
                _assert_identity(before[v.path], after[v.path], measured[v.path], dtype)
                scale = np.abs(before[v.path]).max() / eta
                np.testing.assert_allclose(_np(measured[v.path].direction), _np(el.direction),
                                           atol=16 * np.finfo(dtype).eps * max(1.0, scale))
        report = lrscope.inspect(optimizer, grads=grads, variables=trained)
        groups = {g.name: g for g in report.groups}
        assert report.family == "muon" and set(groups) == {"muon", "adam"}
        assert {p.split("/")[-1] for p in groups["muon"].params} == MUON_PATH[case]
        assert {p.split("/")[-1] for p in groups["adam"].params} == set(SHAPES) - MUON_PATH[case]
        muon, adam = groups["muon"], groups["adam"]
        assert muon.lr == pytest.approx(lr, rel=1e-6) and muon.step_size == muon.lr
        adam_lr = float(np.float32(lr) * np.float32(optimizer.adam_lr_ratio))
        assert adam.lr == pytest.approx(adam_lr, rel=1e-7)
        assert adam.lr_source == ("lr*adam_lr_ratio" if optimizer.adam_lr_ratio != 1 else "lr")
        assert adam.step_size == pytest.approx(lrscope.step_size(
            "adam", step, lr=adam_lr, convention="keras", betas=(optimizer.adam_beta_1, optimizer.adam_beta_2)),
            rel=BETA_ROUNDING)
        assert muon.weight_decay_rate == pytest.approx(lr * (optimizer.weight_decay or 0), rel=1e-6)
        assert adam.weight_decay_rate == pytest.approx(lr * (optimizer.adam_weight_decay or 0), rel=1e-6)
        for name, param in muon.params.items():  # one eta per matrix: the adjusted lr
            eta = _adjusted(float(np.float32(lr)), param.shape, optimizer.rms_rate)
            assert param.effective_lr.min == pytest.approx(eta, rel=1e-6)
            assert param.effective_lr.max == pytest.approx(eta, rel=1e-6)
        for group in (muon, adam):
            _assert_update_norm(group.update_norm, before, after, group.params, dtype)


def test_muon_update_norms_without_grads_or_copy() -> None:
    """Without grads= and without a copy, Muon with Nesterov reports the exact eta of every
    matrix, the Adam group's update norms (from its state) and says what the Muon group's
    need; the monitor's before_step() takes the copy, measuring them."""
    dtype = _dtype("muon")
    rng = np.random.default_rng(3)
    trained = _variables(rng, dtype)
    optimizer = _O.Muon(1e-2)
    monitor = lrscope.watch(optimizer, findings=False)
    for step in range(1, 3):
        grads = _grads(rng, trained)
        monitor.before_step(trained)
        before = _values(trained)
        optimizer.apply(grads, trained)
        after = _values(trained)
        report = monitor.step()
        groups = {g.name: g for g in report.groups}
        for group in groups.values():
            _assert_update_norm(group.update_norm, before, after, group.params, dtype)
        assert any("measured from the copy of the matrices" in n for n in report.notes)
    report = lrscope.inspect(optimizer)
    groups = {g.name: g for g in report.groups}
    assert groups["muon"].update_norm is None and groups["muon"].effective_lr is not None
    assert groups["adam"].update_norm is not None
    assert any("needs grads= or a copy of the variables" in n for n in report.notes)


# --- ScheduleFreeAdamW -----------------------------------------------------------------------

SCHEDULE_FREE = {
    "sf_schedule": lambda: _O.ScheduleFreeAdamW(_schedule()),
    "sf_warmup_wd": lambda: _O.ScheduleFreeAdamW(0.01, warmup_steps=3, weight_decay=0.1),
}


@pytest.mark.parametrize("case", sorted(SCHEDULE_FREE))
def test_schedule_free_identity_on_real_steps(case: str) -> None:
    """The z-sequence moves by -eta * g (eta = lr_t / (sqrt(v_hat) + eps), lr_t the
    warmed-up lr), the parameters y by the change rebuilt from z, y and g after the step;
    reported: lr = lr_t, ckp1 = 1 / t, the decay of y on the un-warmed lr."""
    dtype = _dtype()
    rng = np.random.default_rng(4)
    trained = _variables(rng, dtype)
    optimizer = SCHEDULE_FREE[case]()
    optimizer.exclude_from_weight_decay(var_names=["scalar"])
    optimizer.build(trained)
    for step in range(1, 6):
        grads = _grads(rng, trained)
        before, z_before = _values(trained), [_np(z) for z in optimizer._momentums]
        optimizer.apply(grads, trained)
        after = _values(trained)
        moved = dict(lrscope.keras.elementwise(optimizer, grads=grads, variables=trained))
        rtol, atol = _tolerances(dtype)
        for v, g, z_old, z in zip(trained, grads, z_before, optimizer._momentums):
            el = moved[v.path]
            assert el.decay_rate == 0  # Keras decays y, not z
            np.testing.assert_allclose(_np(z) - z_old, -_np(el.eta) * _np(el.direction), rtol=rtol,
                                       atol=atol * max(1.0, float(np.abs(z_old).max())))
            np.testing.assert_array_equal(_np(el.direction), _np(g))
            _assert_identity(before[v.path], after[v.path], el, dtype)
        report = lrscope.inspect(optimizer, grads=grads, variables=trained)
        group = report.groups[0]
        lr = 1e-2 * 0.5 ** (step - 1) if case == "sf_schedule" else 1e-2
        warmed = lr * min(step / optimizer.warmup_steps, 1) if optimizer.warmup_steps else lr
        assert report.family == "schedule_free"
        assert group.lr == pytest.approx(warmed, rel=1e-6)
        assert group.lr_source == ("lr*min(1,t/warmup_steps)" if optimizer.warmup_steps else "lr")
        assert group.extra == {"ckp1": pytest.approx(1 / step)}
        assert group.step_size == pytest.approx(warmed * math.sqrt(1 - 0.999**step), rel=BETA_ROUNDING)
        # Keras on torch computes 1 - wd * lr in float32 (an ulp of 1 is 6e-8): reported as is.
        assert group.weight_decay_rate == pytest.approx(lr * (optimizer.weight_decay or 0), rel=1e-6, abs=1e-7)
        _assert_update_norm(group.update_norm, before, after, before, dtype)


def test_schedule_free_parameters_follow_the_backend() -> None:
    """What the parameters hold after a step differs by backend, and lrscope models each:
    on TensorFlow and torch Keras reads ``momentum.value`` after updating it (the live
    variable), so y becomes the running average of the z iterates, ``(1 - 1/t) * y_dec +
    z / t``; on JAX (immutable arrays) ``(1 - beta1) * z + beta1 * lerp(x_old, z, 1/t)``."""
    dtype = _dtype()
    rng = np.random.default_rng(5)
    w = keras.Variable(rng.normal(size=(4, 3)), dtype=dtype, name="w")
    optimizer = _O.ScheduleFreeAdamW(0.05)
    optimizer.build([w])
    beta1 = float(np.float32(optimizer.beta_1)) if BACKEND == "tensorflow" else optimizer.beta_1
    for t in range(1, 4):
        y_old, z_old = _np(w), _np(optimizer._momentums[0])
        optimizer.apply(_grads(rng, [w], tiny=False), [w])
        z = _np(optimizer._momentums[0])
        averaged = (1 - 1 / t) * y_old + z / t
        x_old = (y_old - (1 - beta1) * z_old) / beta1
        interpolated = (1 - beta1) * z + beta1 * ((1 - 1 / t) * x_old + z / t)
        expected = averaged if BACKEND in ("tensorflow", "torch") else interpolated
        np.testing.assert_allclose(_np(w), expected, rtol=1e-5 if dtype == "float32" else 1e-12)
        if t > 1:
            assert not np.allclose(averaged, interpolated, rtol=1e-3)


def test_schedule_free_evaluation_is_not_a_step() -> None:
    """Keras never swaps x into the model: evaluate() runs at y, moves nothing and the next
    report is the next step's, as if evaluate() had not run."""
    dtype = _dtype()
    x, y = _data(dtype)
    model = _model(dtype, seed=6)
    model.compile(optimizer=_O.ScheduleFreeAdamW(1e-2, warmup_steps=2), loss="mse")
    sink = CollectSink()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink])])
    before = [_np(v) for v in model.trainable_variables]
    report = lrscope.inspect(model.optimizer)
    model.evaluate(x, y, verbose=0)
    for a, b in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a, _np(b))
    again = lrscope.inspect(model.optimizer)
    assert (again.t, again.groups[0].lr, again.groups[0].effective_lr.mean) == (
        report.t, report.groups[0].lr, report.groups[0].effective_lr.mean)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink])])
    assert [r.t for r in sink.reports] == list(range(1, 9))
    assert [r.groups[0].lr for r in sink.reports[:3]] == pytest.approx([5e-3, 1e-2, 1e-2], rel=1e-6)


# --- MultiOptimizer ---------------------------------------------------------------------------


def _multi() -> tuple[keras.optimizers.Optimizer, dict[str, keras.optimizers.Optimizer]]:
    subs = {"adam": _O.Adam(_schedule(), weight_decay=0.01), "sgd": _O.SGD(0.1, momentum=0.9),
            "ftrl": _O.Ftrl(0.5), "muon": _O.Muon(1e-2, exclude_embeddings=False)}
    mapping = _O.OptimizerMap(subs["adam"], {"matrix": subs["sgd"], "vector": subs["ftrl"], "wide|embedding": subs["muon"]})
    return _O.MultiOptimizer(mapping), subs


def test_multi_optimizer_groups_and_identity() -> None:
    """Each sub-optimizer is a group of its own (named after it), modelled as it is alone:
    the identity holds for every variable, each group's scalars are its optimizer's."""
    dtype = _dtype("muon")
    rng = np.random.default_rng(7)
    trained = _variables(rng, dtype)
    optimizer, subs = _multi()
    names = {opt.name: key for key, opt in subs.items()}
    for step in range(1, 4):
        grads = _grads(rng, trained)
        recorded = reader_for(optimizer).record_before(trained if step == 1 else None)
        before = _values(trained)
        optimizer.apply(grads, trained)
        after = _values(trained)
        moved = dict(lrscope.keras.elementwise(optimizer, grads=grads, variables=trained, recorded=recorded))
        assert set(moved) == set(before)
        for v in trained:
            _assert_identity(before[v.path], after[v.path], moved[v.path], dtype)
        report = reader_for(optimizer).report(grads=grads, variables=trained, recorded=recorded)
        assert report.t == step and report.optimizer == "MultiOptimizer" and report.family is None
        groups = {names[g.name]: g for g in report.groups}
        assert {k: {p.split("/")[-1] for p in g.params} for k, g in groups.items()} == {
            "adam": {"scalar"}, "sgd": {"matrix"}, "ftrl": {"vector"}, "muon": {"wide", "embedding"}}
        for key, group in groups.items():
            alone = lrscope.inspect(subs[key]).groups[0]
            assert (group.lr, group.step_size, group.weight_decay_rate) == (
                alone.lr, alone.step_size, alone.weight_decay_rate)
            _assert_update_norm(group.update_norm, before, after, group.params, dtype)


def test_multi_optimizer_in_fit_with_a_callable_map() -> None:
    """A callable map (its optimizers known once built, on TensorFlow inside fit's first
    step): the callback reports a group per sub-optimizer from step 1 on, and training is
    unchanged by it."""
    dtype = _dtype()
    x, y = _data(dtype)
    weights = []
    for watched in (False, True):
        adam, sgd = _O.Adam(1e-2), _O.SGD(0.1, momentum=0.5)
        model = _model(dtype, seed=8)
        model.compile(optimizer=_O.MultiOptimizer(lambda v: sgd if "out" in v.path else adam), loss="mse")
        sink = CollectSink()
        callbacks = [lrscope.keras.EffectiveLRCallback(sinks=[sink])] if watched else []
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([_np(v) for v in model.trainable_variables])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert [r.t for r in sink.reports] == [1, 2, 3, 4]
    for report in sink.reports:
        groups = {g.name: g for g in report.groups}
        assert set(groups) == {adam.name, sgd.name}
        assert {p.split("/")[0] for p in groups[sgd.name].params} == {"out"}
        assert groups[adam.name].step_size == pytest.approx(
            lrscope.step_size("adam", report.t, lr=1e-2, convention="keras"), rel=BETA_ROUNDING)
        assert groups[sgd.name].effective_lr.count == 4 * 2 + 2


# --- in model.fit, and what is not modelled ---------------------------------------------------


def _model(dtype: str, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), dtype=dtype)
    hidden = keras.layers.Dense(4, activation="tanh", dtype=dtype, name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, dtype=dtype, name="out")(hidden))


def _data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    return rng.normal(size=(32, 6)).astype(dtype), rng.normal(size=(32, 2)).astype(dtype)


class _Realized(keras.callbacks.Callback):
    """Each fit step's variables before and after, read independently of lrscope."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[dict, dict]] = []

    def _weights(self) -> dict[str, np.ndarray]:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        return _values(self.model.trainable_variables)

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self.before = self._weights()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.steps.append((self.before, self._weights()))


@pytest.mark.parametrize("make", [lambda: _O.Muon(_schedule()), lambda: _O.Muon(_schedule(), nesterov=False),
                                  lambda: _O.Ftrl(0.5)], ids=["muon", "muon_plain", "ftrl"])
def test_callback_in_fit_measures_exact_update_norms(make) -> None:
    """In fit (no gradients): Muon with Nesterov and Ftrl take their d from the copy the
    callback takes before each step; Muon without Nesterov computes it from the state (the
    step ran compiled, lrscope's Newton-Schulz eagerly); every update norm is the real one."""
    optimizer = make()
    dtype = _dtype("muon" if isinstance(optimizer, _O.Muon) else "")
    x, y = _data(dtype)
    model = _model(dtype, seed=10)
    model.compile(optimizer=optimizer, loss="mse")
    sink, realized = CollectSink(), _Realized()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink]), realized])
    assert [r.t for r in sink.reports] == [1, 2, 3, 4]
    for report, (before, after) in zip(sink.reports, realized.steps):
        names = {g.name for g in report.groups}
        assert names == ({"muon", "adam"} if isinstance(optimizer, _O.Muon) else {"pg0"})
        for group in report.groups:
            for path, param in group.params.items():
                _assert_update_norm(param.update_norm, before, after, [path], dtype)


class _MuonOwnScale(_O.Muon):
    def lr_adjust(self, x):
        return x * 0.5


class _MuonNewOption(_O.Muon):
    """A Muon from a later release, with an option lrscope does not know."""

    def get_config(self):
        return {**super().get_config(), "consistent_rms": 0.3}


class _MultiOwnApply(_O.MultiOptimizer):
    def apply(self, grads, trainable_variables=None):
        super().apply(grads, trainable_variables)


@pytest.mark.parametrize("make, said", [
    (lambda: _MuonOwnScale(1e-2), "_MuonOwnScale is not a Keras optimizer lrscope models exactly"),
    (lambda: _MuonNewOption(1e-2), "option(s) consistent_rms=0.3 not modelled"),
    (lambda: _O.ScheduleFreeAdamW(1e-2, use_ema=True, ema_overwrite_frequency=2), "ema_overwrite_frequency=2"),
    (lambda: _MultiOwnApply(_O.OptimizerMap(_O.Adam(1e-2))), "_MultiOwnApply is not a Keras optimizer"),
], ids=["muon-own-lr_adjust", "muon-new-option", "sf-ema-overwrite", "multi-own-apply"])
def test_what_is_not_modelled_is_said_and_measured(make, said) -> None:
    """A subclass overriding a method of the step, or an option lrscope does not know:
    no distributions (never a guess), a note; empirical mode measures the real update."""
    dtype = _dtype("muon")
    rng = np.random.default_rng(11)
    trained = _variables(rng, dtype)
    optimizer = make()
    optimizer.apply(_grads(rng, trained), trained)
    report = lrscope.inspect(optimizer)
    assert all(g.effective_lr is None for g in report.groups)
    assert any(said in note for note in report.notes), report.notes
    with pytest.warns(RuntimeWarning, match="measured instead"):
        monitor = lrscope.watch(optimizer, empirical=True, findings=False)
    monitor.before_step()
    before = _values(trained)
    optimizer.apply(_grads(rng, trained), trained)
    report = monitor.step()
    after = _values(trained)
    assert report.empirical
    measured = {p: param for g in report.groups for p, param in g.params.items()}
    for path, param in measured.items():
        _assert_update_norm(param.update_norm, before, after, [path], dtype)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras on torch runs one step per execution")
@pytest.mark.parametrize("make", [lambda: _O.Muon(1e-2), lambda: _O.Ftrl(0.5)], ids=["muon", "ftrl"])
def test_steps_per_execution_keeps_eta_and_drops_only_the_measured_update(make) -> None:
    """One callback per 4 steps: the copy taken before the first of them does not give the
    last step's d, so its update norms are left out (with a note); eta, which the state
    gives, is still reported."""
    optimizer = make()
    dtype = _dtype("muon" if isinstance(optimizer, _O.Muon) else "")
    x, y = _data(dtype)
    model = _model(dtype, seed=12)
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=4)
    sink = CollectSink()
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0,
              callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink])])
    assert [r.t for r in sink.reports] == [4, 8, 12, 16]
    for report in sink.reports:
        measured = [g for g in report.groups if g.name != "adam"]  # Muon's Adam rule needs no copy
        assert all(g.effective_lr is not None and g.update_norm is None for g in measured)
        assert any("covers 4 steps" in n and "update norms skipped" in n for n in report.notes)


def test_gradient_accumulation_reports_the_real_steps() -> None:
    """With gradient_accumulation_steps=2 only every second apply steps: Muon's report of it
    measures the real change (from the copy before_step() takes before that call), and
    ScheduleFreeAdamW's warmup, ckp1 and Adam's bias corrections count real steps."""
    dtype = _dtype("muon")
    rng = np.random.default_rng(13)
    trained = _variables(rng, dtype)
    muon = _O.Muon(1e-2, gradient_accumulation_steps=2)
    schedule_free = _O.ScheduleFreeAdamW(1e-2, warmup_steps=2, gradient_accumulation_steps=2)
    monitors = [lrscope.watch(opt, findings=False) for opt in (muon, schedule_free)]
    for call in range(1, 5):
        grads = _grads(rng, trained)
        monitors[0].before_step(trained if call == 1 else None)
        before = _values(trained)
        muon.apply(grads, trained)
        after = _values(trained)
        report = monitors[0].step()
        schedule_free.apply(grads, [keras.Variable(v, name=v.name) for v in trained] if call == 1 else None)
        sf_report = monitors[1].step()
        if call % 2:
            assert report is None and sf_report is None
            continue
        t = call // 2
        assert report.t == sf_report.t == t
        for group in report.groups:
            _assert_update_norm(group.update_norm, before, after, group.params, dtype)
        adam = {g.name: g for g in report.groups}["adam"]
        assert adam.step_size == pytest.approx(
            lrscope.step_size("adam", t, lr=1e-2, convention="keras"), rel=BETA_ROUNDING)
        group = sf_report.groups[0]
        assert group.lr == pytest.approx(1e-2 * min(t / 2, 1), rel=1e-6)
        assert group.extra["ckp1"] == pytest.approx(1 / t)
