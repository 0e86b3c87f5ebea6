"""Keras 3 backend against the real Keras optimizers, on the backend KERAS_BACKEND selects.

The Makefile runs this file under tensorflow, jax and torch.  Variables are float64
where the backend has it (jax without x64 has not: float32 with float32 tolerances).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import CollectSink

keras = pytest.importorskip("keras")

import lrscope  # noqa: E402
import lrscope.keras  # noqa: E402
from lrscope.keras.reader import KerasReader  # noqa: E402

from keras import ops  # noqa: E402

BACKEND = keras.backend.backend()
DTYPE = "float32" if BACKEND == "jax" else "float64"
RTOL, ATOL = (1e-5, 4e-7) if DTYPE == "float32" else (1e-9, 1e-14)
#: Keras rounds Nadam's 0.96 (momentum schedule) through float32, lrscope uses 0.96.
#: lamb: the trust ratio is solved from a quadratic.  adafactor: Keras on torch rounds
#: RMS(theta) to float32 precision; lrscope recovers the exact RMS.
CASE_RTOL = {"nadam": 1e-6, "lamb": 1e-8, "adafactor": 1e-6}
#: Keras rounds beta1/beta2 through float32 for the bias corrections: reports say what
#: Keras does, lrscope.step_size what the formula says with the exact betas.
BETA_ROUNDING = 1e-4
SHAPES = {"scalar": (), "vector": (5,), "matrix": (4, 3)}
_O = keras.optimizers


class CustomFtrl(_O.Ftrl):
    """An optimizer lrscope does not model: a subclass overriding ``update_step`` (Ftrl
    itself is modelled, tests/test_keras_newer.py)."""

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, learning_rate)


def _schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    # Halving every step: a schedule read at the wrong index breaks the identity.
    return _O.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)


CASES = {
    "adam": lambda: _O.Adam(_schedule()),
    "adam_amsgrad_wd": lambda: _O.Adam(_schedule(), amsgrad=True, weight_decay=0.1),
    "adamw": lambda: _O.AdamW(_schedule(), weight_decay=0.05, epsilon=1e-3),
    "sgd": lambda: _O.SGD(_schedule()),
    "sgd_momentum": lambda: _O.SGD(_schedule(), momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda: _O.SGD(_schedule(), momentum=0.9, nesterov=True),
    "rmsprop": lambda: _O.RMSprop(_schedule()),
    "rmsprop_centered_momentum": lambda: _O.RMSprop(_schedule(), centered=True, momentum=0.5),
    "adagrad": lambda: _O.Adagrad(_schedule(), weight_decay=0.01),
    "adamax": lambda: _O.Adamax(_schedule()),
    "nadam": lambda: _O.Nadam(_schedule(), weight_decay=0.01),
    "adadelta": lambda: _O.Adadelta(_schedule()),
    "lion": lambda: _O.Lion(_schedule(), weight_decay=0.1),
    "lamb": lambda: _O.Lamb(_schedule(), weight_decay=0.1),
    "adafactor": lambda: _O.Adafactor(_schedule(), weight_decay=0.1),
    "adafactor_tiny_params": lambda: _O.Adafactor(_schedule(), epsilon_2=10.0),
    "adam_clipnorm": lambda: _O.Adam(_schedule(), global_clipnorm=0.5),
    "adam_ema": lambda: _O.Adam(_schedule(), use_ema=True, ema_momentum=0.9),
    "adam_loss_scale": lambda: _O.LossScaleOptimizer(_O.Adam(_schedule())),
}


def _skip_loss_scale_on_jax() -> None:
    if BACKEND == "jax":
        pytest.skip("Keras' LossScaleOptimizer.apply leaks a tracer when called eagerly on JAX")


def _variables(rng: np.random.Generator) -> dict[str, keras.Variable]:
    return {
        name: keras.Variable(rng.normal(size=shape), dtype=DTYPE, name=name)
        for name, shape in SHAPES.items()
    }


def _grads(rng: np.random.Generator, variables: list) -> list:
    # Mixed magnitudes so eps dominates somewhere and not elsewhere.
    return [
        ops.convert_to_tensor(
            rng.normal(size=v.shape) * 10.0 ** rng.integers(-9, 1, size=v.shape), dtype=DTYPE
        )
        for v in variables
    ]


def _assert_identity(before: np.ndarray, after: np.ndarray, el, rtol: float = RTOL) -> None:
    eta, d, decay = (
        np.asarray(x if isinstance(x, (int, float)) else ops.convert_to_numpy(x), np.float64)
        for x in (el.eta, el.direction, el.decay_rate)
    )
    predicted = -eta * d - decay * before
    np.testing.assert_allclose(
        after - before,
        predicted,
        rtol=max(rtol, RTOL),
        atol=ATOL * max(1.0, float(np.abs(before).max())),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_on_real_steps(case: str) -> None:
    """SPEC §5: theta_after - theta_before == -eta * d - decay * theta_before, every step."""
    rng = np.random.default_rng(0)
    variables = _variables(rng)
    frozen = keras.Variable(np.ones(3), dtype=DTYPE, trainable=False)
    trained = list(variables.values())
    if case == "adam_loss_scale":
        _skip_loss_scale_on_jax()
    optimizer = CASES[case]()
    if case == "adam_amsgrad_wd":
        optimizer.exclude_from_weight_decay(var_names=["scalar"])
    optimizer.build(trained)
    scale = 8.0 if case == "adam_loss_scale" else 1.0
    for step in range(1, 5):
        grads = _grads(rng, trained)
        recorded = KerasReader(optimizer).record_before()
        before = {v.path: np.asarray(ops.convert_to_numpy(v), np.float64) for v in trained}
        # LossScaleOptimizer.apply unscales by its dynamic scale; hand it scaled gradients.
        if case == "adam_loss_scale":
            scale = float(ops.convert_to_numpy(optimizer.dynamic_scale))
        optimizer.apply([g * scale for g in grads], trained)
        moved = dict(
            lrscope.keras.elementwise(optimizer, grads=grads, variables=trained, recorded=recorded)
        )
        assert set(moved) == set(before)
        for v in trained:
            _assert_identity(
                before[v.path],
                np.asarray(ops.convert_to_numpy(v), np.float64),
                moved[v.path],
                CASE_RTOL.get(case, RTOL),
            )
        report = lrscope.inspect(optimizer, grads=grads, variables=trained)
        assert report.t == step and report.framework == "keras"
        assert report.groups[0].lr == pytest.approx(1e-2 * 0.5 ** (step - 1), rel=1e-6)
    np.testing.assert_array_equal(ops.convert_to_numpy(frozen), np.ones(3))


@pytest.mark.parametrize(
    "case", ["adam", "adamw", "rmsprop_centered_momentum", "sgd_momentum", "lamb"]
)
def test_update_norms_without_grads(case: str) -> None:
    """Families whose direction lives in the state give update norms without grads=."""
    rng = np.random.default_rng(1)
    trained = list(_variables(rng).values())
    optimizer = CASES[case]()
    before = None
    for _ in range(3):
        before = [np.asarray(ops.convert_to_numpy(v), np.float64) for v in trained]
        optimizer.apply(_grads(rng, trained), trained)
    after = [np.asarray(ops.convert_to_numpy(v), np.float64) for v in trained]
    group = lrscope.inspect(optimizer).groups[0]
    realized = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    assert group.update_norm == pytest.approx(realized, rel=1e-4)
    assert group.param_norm == pytest.approx(np.sqrt(sum((a**2).sum() for a in after)), rel=1e-6)


def test_quantiles_match_numpy() -> None:
    rng = np.random.default_rng(2)
    trained = [
        keras.Variable(rng.normal(size=(64, 32)), dtype=DTYPE),
        keras.Variable(rng.normal(size=(50,)), dtype=DTYPE),
    ]
    optimizer = _O.Adam(1e-3)
    for _ in range(3):
        optimizer.apply(_grads(rng, trained), trained)
    eta = np.concatenate(
        [np.ravel(ops.convert_to_numpy(el.eta)) for _, el in lrscope.keras.elementwise(optimizer)]
    ).astype(np.float64)
    dist = lrscope.inspect(optimizer).groups[0].effective_lr
    # On JAX (float32) the jitted statistics take Adam's bias corrections in float32, as
    # Keras' step does; elementwise() takes them in float64.
    rel = max(RTOL, 1e-6)
    assert dist.count == eta.size
    assert dist.min == pytest.approx(eta.min(), rel=rel) and dist.max == pytest.approx(eta.max(), rel=rel)
    assert dist.mean == pytest.approx(eta.mean(), rel=rel)
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert dist.quantile(q) == pytest.approx(np.quantile(eta, q), rel=0.01)
    eps_hat = 1e-7 / np.sqrt(1 - 0.999**3)
    v_hat = np.concatenate([np.ravel(ops.convert_to_numpy(v)) for v in optimizer._velocities]) / (
        1 - 0.999**3
    )
    assert dist.eps_dominated == pytest.approx(np.mean(np.sqrt(v_hat) < eps_hat))


def test_gradient_accumulation_reports_only_real_steps() -> None:
    rng = np.random.default_rng(3)
    trained = list(_variables(rng).values())
    optimizer = _O.Adam(_schedule(), gradient_accumulation_steps=3)
    monitor = lrscope.watch(optimizer)
    reports = []
    for _ in range(7):
        before = [np.asarray(ops.convert_to_numpy(v)) for v in trained]
        optimizer.apply(_grads(rng, trained), trained)
        report = monitor.step()
        moved = any(not np.array_equal(b, ops.convert_to_numpy(v)) for b, v in zip(before, trained))
        assert (report is not None) == moved
        if report is not None:
            reports.append(report)
    assert [r.t for r in reports] == [1, 2]
    # The step at raw iteration 3t - 1 used the schedule evaluated there.
    assert [r.groups[0].lr for r in reports] == pytest.approx(
        [1e-2 * 0.5**2, 1e-2 * 0.5**5], rel=1e-6
    )
    assert reports[-1].groups[0].step_size == pytest.approx(
        lrscope.step_size("adam", 2, lr=1e-2 * 0.5**5, convention="keras"), rel=BETA_ROUNDING
    )


def test_loss_scale_skipped_step_is_reported() -> None:
    _skip_loss_scale_on_jax()
    rng = np.random.default_rng(4)
    trained = list(_variables(rng).values())
    optimizer = _O.LossScaleOptimizer(_O.Adam(1e-3))
    monitor = lrscope.watch(optimizer)
    optimizer.apply(_grads(rng, trained), trained)
    assert monitor.step().t == 1
    optimizer.apply([g * np.inf for g in _grads(rng, trained)], trained)
    report = monitor.step()
    assert report.skipped and report.t == 1


def test_unsupported_optimizer_is_named_not_guessed() -> None:
    rng = np.random.default_rng(5)
    trained = list(_variables(rng).values())
    optimizer = CustomFtrl(1e-2)
    optimizer.apply(_grads(rng, trained), trained)
    report = lrscope.inspect(optimizer)
    assert report.family is None and report.groups[0].lr == pytest.approx(1e-2)
    assert "CustomFtrl" in report.notes[0]
    with pytest.raises(TypeError, match="CustomFtrl"):
        list(lrscope.keras.elementwise(optimizer))
    with pytest.warns(RuntimeWarning, match="CustomFtrl") as record:
        lrscope.watch(optimizer).close()
    assert record[0].filename == __file__  # the user's line, not lrscope's
    with pytest.raises(TypeError, match="this is the model: pass model.optimizer"):
        lrscope.watch(_model(0))


def test_inspect_before_the_first_step_says_so() -> None:
    rng = np.random.default_rng(7)
    trained = list(_variables(rng).values())
    optimizer = _O.Adam(1e-3)
    optimizer.build(trained)
    before = lrscope.inspect(optimizer)
    assert before.t == 0 and any("no optimizer step has been taken yet" in n for n in before.notes)
    optimizer.apply(_grads(rng, trained), trained)
    after = lrscope.inspect(optimizer)
    assert after.t == 1 and not any("no optimizer step" in n for n in after.notes)


def test_adadelta_inspect_notes_missing_history() -> None:
    rng = np.random.default_rng(6)
    trained = list(_variables(rng).values())
    optimizer = _O.Adadelta(1.0)
    optimizer.apply(_grads(rng, trained), trained)
    # Step 1 starts from Keras' zero accumulator: nothing needs recording.
    assert lrscope.inspect(optimizer).groups[0].effective_lr.count == 18
    optimizer.apply(_grads(rng, trained), trained)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].effective_lr is None
    assert any("Adadelta" in note for note in report.notes)


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), dtype=DTYPE)
    frozen = keras.layers.Dense(5, dtype=DTYPE, trainable=False)
    outputs = keras.layers.Dense(2, dtype=DTYPE)(
        keras.layers.Dense(4, activation="tanh", dtype=DTYPE)(frozen(inputs))
    )
    return keras.Model(inputs, outputs)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(32, 6)).astype(DTYPE), rng.normal(size=(32, 2)).astype(DTYPE)


class _Snapshot(keras.callbacks.Callback):
    """Checks the identity of every fit step with lrscope's eta and d (Adam: d from state)."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def _weights(self) -> dict[str, np.ndarray]:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        return {
            v.path: np.asarray(ops.convert_to_numpy(v), np.float64)
            for v in self.model.trainable_variables
        }

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self.before = self._weights()

    def on_train_batch_end(self, batch, logs=None) -> None:
        after = self._weights()
        for path, el in lrscope.keras.elementwise(self.model.optimizer):
            _assert_identity(self.before[path], after[path], el)
            self.checked += 1


def test_callback_in_model_fit() -> None:
    x, y = _data()
    model = _model(0)
    model.compile(optimizer=_O.AdamW(_schedule(), weight_decay=0.01), loss="mse")
    sink = CollectSink()
    callback = lrscope.keras.EffectiveLRCallback(sinks=[sink], every=2)
    snapshot = _Snapshot()
    model.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[snapshot, callback]
    )
    assert [r.t for r in sink.reports] == list(range(1, 9))
    assert snapshot.checked == 8 * 4  # two trained Dense layers, kernel and bias
    for r in sink.reports:
        group = r.groups[0]
        assert group.lr == pytest.approx(1e-2 * 0.5 ** (r.t - 1), rel=1e-6)
        assert group.step_size == pytest.approx(
            lrscope.step_size("adam", r.t, lr=group.lr, convention="keras"), rel=BETA_ROUNDING
        )
        # Keras on torch computes 1 - wd * lr in float32 (an ulp of 1 is 6e-8): reported as is.
        assert group.weight_decay_rate == pytest.approx(group.lr * 0.01, rel=1e-6, abs=1e-7)
        assert (group.effective_lr is not None) == (r.t % 2 == 1)
    assert set(callback.last.groups[0].params) == {v.path for v in model.trainable_variables}
    assert callback.last is sink.reports[-1]
    named = lrscope.keras.EffectiveLRCallback(sinks=[CollectSink()], name="student")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[named])
    assert named.last.name == "student" and "lr-student/pg0/step_size" in named.last.scalars()


@pytest.mark.skipif(BACKEND == "torch", reason="Keras on torch runs one step per execution")
def test_steps_per_execution_keeps_the_schedule() -> None:
    """With steps_per_execution=4 fit calls back once per 4 steps: distributions are
    measured on the first report at or past each of steps 1, 11, 21, ... (with t % 10 == 1
    alone they never would be); Adadelta, whose history is then 4 steps old, says so."""
    x, y = _data()
    for optimizer in (_O.Adam(1e-2), _O.Adadelta(1.0)):
        model = _model(0)
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=4)
        sink = CollectSink()
        model.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0,
                  callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink], every=10)])
        reported = [r.t for r in sink.reports]
        assert reported == list(range(4, reported[-1] + 1, 4)) and reported[-1] >= 40
        measured = [r.t for r in sink.reports if r.groups[0].effective_lr is not None]
        due = sorted({min(t for t in reported if t >= g) for g in range(1, reported[-1] + 1, 10)})
        if isinstance(optimizer, _O.Adam):
            assert measured == due
        else:
            assert measured == []
            assert any("covers 4 steps" in note for r in sink.reports for note in r.notes)


def test_callback_does_not_change_training() -> None:
    x, y = _data()
    weights = []
    for callbacks in ([], [lrscope.keras.EffectiveLRCallback(sinks=[CollectSink()])]):
        model = _model(1)
        model.compile(optimizer=_O.Adam(1e-2), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([np.asarray(ops.convert_to_numpy(v)) for v in model.trainable_variables])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_a_failing_measurement_warns_once_and_fit_goes_on(monkeypatch) -> None:
    """If measuring the distributions raises (an error injected into the statistics), the
    callback warns once, reports the scalars from then on, and fit trains as without it."""
    monkeypatch.setattr(KerasReader, "_statistics", lambda *args: 1 / 0)
    x, y = _data()
    weights = []
    for callbacks in ([], [lrscope.keras.EffectiveLRCallback(sinks=[CollectSink()], every=3)]):
        model = _model(1)
        model.compile(optimizer=_O.Adam(1e-2), loss="mse")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([np.asarray(ops.convert_to_numpy(v)) for v in model.trainable_variables])
    failures = [w for w in record if "distributions failed (ZeroDivisionError" in str(w.message)]
    assert len(failures) == 1 and failures[0].filename == __file__  # the fit(...) line
    last = callbacks[0].last
    assert last.t == int(ops.convert_to_numpy(model.optimizer.iterations))
    assert last.groups[0].effective_lr is None and last.groups[0].lr > 0
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


class _AdadeltaEta(keras.callbacks.Callback):
    """Independent eta of each fit step: lr * sqrt(A_before + eps) / sqrt(E + eps)."""

    def __init__(self, lrscope_callback) -> None:
        super().__init__()
        self.lrscope_callback, self.checked = lrscope_callback, 0

    def _state(self, name: str) -> list[np.ndarray]:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        slots = getattr(self.model.optimizer, name)
        return [np.asarray(ops.convert_to_numpy(v), np.float64) for v in slots]

    def on_train_batch_begin(self, batch, logs=None) -> None:
        # On tensorflow the optimizer is built inside the first step: its deltas start at 0.
        built = self.model.optimizer.built
        self.before = self._state("_accumulated_delta_vars") if built else None

    def on_train_batch_end(self, batch, logs=None) -> None:
        eps = self.model.optimizer.epsilon
        after = self._state("_accumulated_grads")
        self.before = self.before or [np.zeros_like(e) for e in after]
        eta = np.concatenate([(np.sqrt(a + eps) / np.sqrt(e + eps)).ravel()
                              for a, e in zip(self.before, after)])  # lr = 1
        dist = self.lrscope_callback.monitor.last.groups[0].effective_lr
        assert dist.count == eta.size
        assert dist.min == pytest.approx(eta.min(), rel=RTOL)
        assert dist.max == pytest.approx(eta.max(), rel=RTOL)
        assert dist.mean == pytest.approx(eta.mean(), rel=RTOL)
        self.checked += 1


def test_callback_records_adadelta_history() -> None:
    """The callback records Adadelta's accumulated delta before each step (batch begin)."""
    x, y = _data()
    model = _model(2)
    model.compile(optimizer=_O.Adadelta(1.0), loss="mse")
    callback = lrscope.keras.EffectiveLRCallback(sinks=[CollectSink()])
    check = _AdadeltaEta(callback)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback, check])
    assert callback.last.t == 4 and check.checked == 4


def test_adafactor_eta_needs_grads() -> None:
    rng = np.random.default_rng(8)
    trained = list(_variables(rng).values())
    optimizer = _O.Adafactor(1e-2)
    grads = _grads(rng, trained)
    optimizer.apply(grads, trained)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].effective_lr is None and any("grads=" in n for n in report.notes)
    assert lrscope.inspect(optimizer, grads=grads).groups[0].effective_lr.count == 18


def test_callback_log_dir_writes_tensorboard(tmp_path) -> None:
    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = _data()
    model = _model(3)
    model.compile(optimizer=_O.Adam(1e-2), loss="mse")
    callback = lrscope.keras.EffectiveLRCallback(log_dir=tmp_path)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    events = EventAccumulator(str(tmp_path)).Reload()
    steps = events.Scalars("lr-Adam/pg0/step_size")
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert steps[-1].value == pytest.approx(callback.last.groups[0].step_size, rel=1e-6)
    assert (tmp_path / "lrscope.jsonl").exists()


@pytest.mark.parametrize("fast", [False, True], ids=["op_by_op", "fast"])
@pytest.mark.parametrize("case", ["adam_amsgrad_wd", "rmsprop_centered_momentum", "lamb"])
def test_chunked_statistics_equal_whole_tensor(case: str, fast: bool, monkeypatch) -> None:
    """Chunks (bounded memory) give the same statistics as one pass over each tensor."""
    from lrscope.keras import stats as keras_stats

    if fast and BACKEND != "tensorflow":
        pytest.skip("keras_jax measures whole variables; torch's chunks are test_torch_fused's")
    if not fast:
        monkeypatch.setenv("LRSCOPE_FUSED", "0")
    rng = np.random.default_rng(9)
    trained = list(_variables(rng).values())
    optimizer = CASES[case]()
    for _ in range(2):
        optimizer.apply(_grads(rng, trained), trained)
    whole = lrscope.inspect(optimizer).groups[0]
    monkeypatch.setattr(keras_stats, "CHUNK_ELEMENTS", 4)
    chunked = lrscope.inspect(optimizer).groups[0]
    a, b = whole.effective_lr.sketch, chunked.effective_lr.sketch
    assert (a.count, a.min, a.max) == (b.count, b.min, b.max)
    assert all(np.array_equal(x, y) for x, y in zip(a.positive, b.positive))
    assert b.sum == pytest.approx(a.sum, rel=1e-6)  # float32 sums on jax: summation order
    assert whole.effective_lr.eps_dominated_count == chunked.effective_lr.eps_dominated_count
    assert chunked.update_norm == pytest.approx(whole.update_norm, rel=1e-6)
    assert chunked.param_norm == pytest.approx(whole.param_norm, rel=1e-6)


def test_unmodelled_option_skips_distributions() -> None:
    """EMA that overwrites the variables breaks the identity: said, not mis-modelled."""
    rng = np.random.default_rng(10)
    trained = list(_variables(rng).values())
    optimizer = _O.Adam(1e-3, use_ema=True, ema_overwrite_frequency=2)
    optimizer.apply(_grads(rng, trained), trained)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].effective_lr is None
    assert any("ema_overwrite_frequency=2" in note for note in report.notes)
    assert report.groups[0].step_size == pytest.approx(
        lrscope.step_size("adam", 1, lr=1e-3, convention="keras"), rel=BETA_ROUNDING)


def test_nonfinite_state_is_redone_with_masking() -> None:
    """The fast pass reduces everything; a variable whose state holds NaN/Inf is measured
    again with masking, the others keep their fast-pass statistics."""
    rng = np.random.default_rng(8)
    trained = list(_variables(rng).values())
    optimizer = _O.Adam(1e-3)
    optimizer.apply(_grads(rng, trained), trained)
    matrix = trained[2]
    velocity = next(v for v in optimizer._velocities if tuple(v.shape) == tuple(matrix.shape))
    poisoned = ops.convert_to_numpy(velocity).copy()
    poisoned[0, 0], poisoned[1, 2] = np.nan, -1.0  # NaN, and a sqrt of a negative (NaN eta)
    poisoned[2, 1] = np.inf  # eta 0: finite
    velocity.assign(poisoned)
    report = lrscope.inspect(optimizer).groups[0]
    exact = {name: np.asarray(ops.convert_to_numpy(el.eta), np.float64).reshape(-1)
             for name, el in lrscope.keras.elementwise(optimizer)}
    assert set(exact) == set(report.params)
    for name, got in report.params.items():
        eta = np.broadcast_to(exact[name], (got.effective_lr.count,)) if exact[name].size == 1 else exact[name]
        finite = eta[np.isfinite(eta)]
        dist = got.effective_lr
        assert dist.nonfinite == eta.size - finite.size == (2 if name == matrix.path else 0)
        assert dist.min == pytest.approx(finite.min(), rel=RTOL)
        assert dist.max == pytest.approx(finite.max(), rel=RTOL)
        assert dist.mean == pytest.approx(finite.mean(), rel=RTOL)


def _fast_cases() -> list[str]:
    """The cases whose statistics take the backend's fast path (``keras_jax`` on JAX,
    ``keras_torch`` on torch, ``keras_tensorflow`` on TensorFlow) rather than
    ``keras_stats`` alone."""
    import importlib

    from lrscope.keras.reader import family_of, unwrap

    fast = importlib.import_module(f"lrscope.keras.backend_{BACKEND}")
    skipped = {"adam_loss_scale"} if BACKEND == "jax" else set()
    return [c for c in sorted(CASES) if c not in skipped and fast.applies(family_of(unwrap(CASES[c]())))]


@pytest.mark.parametrize("case", _fast_cases())
def test_fast_statistics_equal_op_by_op(case: str, monkeypatch) -> None:
    """On JAX every variable's statistics come from one jitted computation
    (``keras_jax``), on torch from lrscope's PyTorch passes (``keras_torch``), on
    TensorFlow from one graph per chunk with the formula inside (``keras_tensorflow``):
    they equal the op-by-op ones (``keras_stats``, whose eta test_identity_on_real_steps
    checks against Keras' real steps)."""
    rng = np.random.default_rng(11)
    trained = list(_variables(rng).values())
    optimizer = CASES[case]()
    if case == "adam_amsgrad_wd":
        optimizer.exclude_from_weight_decay(var_names=["scalar"])
    for _ in range(3):
        grads = _grads(rng, trained)
        recorded = KerasReader(optimizer).record_before()  # Adadelta's history
        optimizer.apply(grads, trained)

    def report():
        return KerasReader(optimizer).report(grads=grads, variables=trained, recorded=recorded)

    fast = report()
    monkeypatch.setenv("LRSCOPE_FUSED", "0")
    op_by_op = report()
    rel = max(CASE_RTOL.get(case, RTOL), RTOL)
    for name, want in op_by_op.groups[0].params.items():
        got = fast.groups[0].params[name]
        a, b = got.effective_lr, want.effective_lr
        assert (a.count, a.nonfinite, a.eps_dominated_count) == (b.count, b.nonfinite, b.eps_dominated_count)
        for field in ("min", "max", "mean"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=rel), field
        for q in (0.01, 0.5, 0.99):
            assert a.quantile(q) == pytest.approx(b.quantile(q), rel=0.02)
        assert got.update_norm == pytest.approx(want.update_norm, rel=rel)
        assert got.param_norm == pytest.approx(want.param_norm, rel=rel)


@pytest.mark.skipif(BACKEND == "torch", reason="test_torch_fused counts torch_fused's kernels")
@pytest.mark.parametrize("path", ["fast", "op_by_op", "lamb"])
def test_statistics_compile_once_per_model(path: str, monkeypatch) -> None:
    """t, a scheduled lr, the weight decay and the state are inputs: later steps compile
    (on TensorFlow, trace) nothing, on the fast path and, on TensorFlow, in the op-by-op
    statistics graph (``keras_stats``: Lamb's, and every family's under LRSCOPE_FUSED=0)."""
    from lrscope.keras import backend_jax as keras_jax, backend_tensorflow as keras_tensorflow, stats as keras_stats

    if path != "fast" and BACKEND != "tensorflow":
        pytest.skip("op by op, only the TensorFlow backend builds a graph")
    if path == "op_by_op":
        monkeypatch.setenv("LRSCOPE_FUSED", "0")

    traced: list[int] = []
    if BACKEND == "tensorflow" and path == "fast":
        # ``_chunk`` runs only while the step's graph is traced.
        chunk = keras_tensorflow._chunk
        monkeypatch.setattr(keras_tensorflow, "_chunk", lambda *args: traced.append(1) or chunk(*args))
        keras_tensorflow._graph.cache_clear()

    def compilations() -> int:
        if BACKEND == "jax":
            return keras_jax._statistics._cache_size()
        return len(traced) if path == "fast" else keras_stats._graph.cache_info().currsize

    rng = np.random.default_rng(12)
    trained = list(_variables(rng).values())
    # NAdam's mu_product, lr and the modelled decay (lr * wd) change every step.
    optimizer = (_O.Lamb if path == "lamb" else _O.Nadam)(_schedule(), weight_decay=0.01)
    counts = []
    for _ in range(3):
        optimizer.apply(_grads(rng, trained), trained)
        assert lrscope.inspect(optimizer).groups[0].effective_lr.count == 18
        counts.append(compilations())
    assert counts[0] > 0 and counts[1] == counts[2] == counts[0]


@pytest.mark.skipif(BACKEND != "torch", reason="the compiled kernel is PyTorch's")
@pytest.mark.parametrize("case", ["adam_amsgrad_wd", "nadam"])
def test_fused_pass_on_torch_equals_op_by_op(case: str, monkeypatch) -> None:
    """Large variables take torch_fused's compiled kernel (parts shrunk so that 5063
    elements make four parts of 1024 and a shorter one); a schedule changes lr, the weight
    decay as modelled and NAdam's mu_product every step, and nothing compiles again."""
    from lrscope.torch import fused as torch_fused, kernel as torch_kernel, small as torch_small

    monkeypatch.setattr(torch_small, "SMALL_ELEMENTS", 999)  # only the bias is batched
    monkeypatch.setattr(torch_fused, "FUSED_MIN_ELEMENTS", 1000)
    monkeypatch.setattr(torch_fused, "PART_ELEMENTS", 1024)
    monkeypatch.setattr(torch_fused, "_kernels", {})
    calls, builds = [], []
    fused, build = torch_fused._fused, torch_kernel.Kernel.build
    monkeypatch.setattr(torch_fused, "_fused", lambda *args: calls.append(1) or fused(*args))
    monkeypatch.setattr(torch_kernel.Kernel, "build", lambda *args: builds.append(1) or build(*args))
    rng = np.random.default_rng(13)
    trained = [keras.Variable(rng.normal(size=(61, 83)), dtype=DTYPE, name="matrix"),
               keras.Variable(rng.normal(size=(7,)), dtype=DTYPE, name="bias")]
    optimizer = CASES[case]()
    for _ in range(3):
        grads = _grads(rng, trained)
        optimizer.apply(grads, trained)
        fast = lrscope.inspect(optimizer, grads=grads, variables=trained)
        with monkeypatch.context() as m:
            m.setenv("LRSCOPE_FUSED", "0")
            op_by_op = lrscope.inspect(optimizer, grads=grads, variables=trained)
        for name, want in op_by_op.groups[0].params.items():
            a, b = fast.groups[0].params[name].effective_lr, want.effective_lr
            assert (a.count, a.eps_dominated_count) == (b.count, b.eps_dominated_count)
            assert (a.min, a.max, a.mean) == pytest.approx((b.min, b.max, b.mean), rel=1e-12)
        assert fast.groups[0].update_norm == pytest.approx(op_by_op.groups[0].update_norm, rel=1e-12)
    assert len(calls) == 3  # the matrix, once per step
    # lr and the weight decay Keras rounds with it change every step: arguments, not constants
    assert len(builds) == 1


# --- Empirical mode: the realized update where lrscope does not model the step -------------


def _assert_realized(report, before: dict, after: dict, tol: float = 1e-6) -> None:
    """Each variable's |delta theta| distribution and norms against numpy's."""
    assert report.empirical
    for path, param in report.groups[0].params.items():
        delta = np.abs(after[path] - before[path]).ravel()
        dist = param.update_magnitude
        assert param.effective_lr is None and dist.count == delta.size
        assert dist.max == pytest.approx(delta.max(), rel=tol)
        assert dist.quantile(0.5) == pytest.approx(np.quantile(delta, 0.5), rel=0.01)
        assert param.update_norm == pytest.approx(np.linalg.norm(delta), rel=tol)
        assert param.param_norm == pytest.approx(np.linalg.norm(after[path]), rel=tol)
    assert report.groups[0].update_magnitude.count == sum(a.size for a in after.values())


@pytest.mark.parametrize("make", [lambda: CustomFtrl(0.5), lambda: _O.Adam(1e-2, use_ema=True, ema_overwrite_frequency=2)],
                         ids=["unmodelled-class", "unmodelled-option"])
def test_empirical_mode_in_a_custom_loop(make) -> None:
    """KerasMonitor(empirical=True): before_step() copies the variables on the steps with
    distributions (the first, before the optimizer is built, given them), and the report
    measures |delta theta| from the copy, as torch's empirical mode does."""
    rng = np.random.default_rng(11)
    trained = list(_variables(rng).values())
    optimizer = make()
    with pytest.warns(RuntimeWarning, match=r"measured instead .*one copy of the trainable variables.*"
                                            r"empirical=False"):
        monitor = lrscope.watch(optimizer, empirical=True, every=2)
    for step in range(1, 6):
        before = {v.path: np.asarray(ops.convert_to_numpy(v), np.float64) for v in trained}
        monitor.before_step(trained if step == 1 else None)
        assert (monitor._recorded is not None and bool(monitor._recorded)) == (step % 2 == 1)
        optimizer.apply(_grads(rng, trained), trained)
        report = monitor.step()
        after = {v.path: np.asarray(ops.convert_to_numpy(v), np.float64) for v in trained}
        if step % 2 == 1:
            _assert_realized(report, before, after)
        else:
            assert report.groups[0].update_magnitude is None
    optimizer.apply(_grads(rng, trained), trained)
    monitor.step()
    optimizer.apply(_grads(rng, trained), trained)  # step 7, measured, with no before_step: said
    report = monitor.step()
    assert report.t == 7 and report.groups[0].update_magnitude is None and any("before_step()" in n for n in report.notes)


def test_without_empirical_mode_the_warning_says_how_and_what_it_costs() -> None:
    with pytest.warns(RuntimeWarning, match=r"CustomFtrl.*pass empirical=True .*one copy of the trainable variables"):
        monitor = lrscope.watch(CustomFtrl(0.5))
    assert not monitor.reader.measured
    # A modelled optimizer needs no copy: empirical=True changes nothing there.
    assert not lrscope.watch(_O.Adam(1e-3), empirical=True).reader.measured


class _Realized(keras.callbacks.Callback):
    """Each fit step's variables before and after, read independently of lrscope."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[dict, dict]] = []

    def _weights(self) -> dict[str, np.ndarray]:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        return {v.path: np.asarray(ops.convert_to_numpy(v), np.float64) for v in self.model.trainable_variables}

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self.before = self._weights()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.steps.append((self.before, self._weights()))


def test_callback_measures_an_unmodelled_optimizer_by_default() -> None:
    """EffectiveLRCallback turns the measured mode on for an optimizer lrscope does not
    model (one warning says so, what it costs and how to turn it off), from fit's first
    step (on TensorFlow the optimizer is built inside it); training is unchanged."""
    x, y = _data()
    weights = []
    for options in (None, {}, {"empirical": False}):
        model = _model(3)
        model.compile(optimizer=CustomFtrl(0.5), loss="mse")
        sink, realized = CollectSink(), _Realized()
        callbacks = [] if options is None else [lrscope.keras.EffectiveLRCallback(sinks=[sink], every=2, **options),
                                                realized]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([np.asarray(ops.convert_to_numpy(v)) for v in model.trainable_variables])
        if options is None:
            continue
        said = [str(w.message) for w in record if "empirical=" in str(w.message)]
        measured = options.get("empirical", True)
        assert len(said) == 1 and ("empirical=False" if measured else "pass empirical=True") in said[0]
        assert [r.t for r in sink.reports] == list(range(1, 9))
        for report, (before, after) in zip(sink.reports, realized.steps):
            if measured and report.t % 2 == 1:
                _assert_realized(report, before, after)
            else:
                assert report.groups[0].update_magnitude is None
    for unwatched, watched in zip(weights[0], weights[1]):
        np.testing.assert_array_equal(unwatched, watched)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras on torch runs one step per execution")
def test_empirical_mode_with_steps_per_execution_says_what_it_skips() -> None:
    """One callback per 4 steps: the copy taken before the first of them does not give the
    last step's update, so the distributions are skipped, with a note."""
    x, y = _data()
    model = _model(0)
    model.compile(optimizer=CustomFtrl(0.5), loss="mse", steps_per_execution=4)
    sink = CollectSink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0,
                  callbacks=[lrscope.keras.EffectiveLRCallback(sinks=[sink])])
    assert [r.t for r in sink.reports] == [4, 8, 12, 16]
    assert all(r.groups[0].update_magnitude is None for r in sink.reports)
    assert all(any("covers 4 steps" in n and "the variables" in n for n in r.notes) for r in sink.reports)
