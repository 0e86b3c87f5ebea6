"""TF1 graph mode (tf.compat.v1.train) against the real optimizers, inside tf.Graph()."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import CollectSink

tf = pytest.importorskip("tensorflow")

import lrscope  # noqa: E402
import lrscope.tf1  # noqa: E402

V1 = tf.compat.v1
INIT = {
    "scalar": np.array(0.7),
    "vector": np.linspace(-1.0, 2.0, 5),
    "matrix": np.arange(12.0).reshape(4, 3) / 7 - 0.5,
}
EMBEDDING = np.arange(18.0).reshape(6, 3) / 10 - 0.4
INPUTS = np.random.default_rng(0).normal(size=(4, 8, 4))
# TF1 keeps hyperparameters as float32 tensors and casts them to the variable dtype.
B1, B2 = float(np.float32(0.9)), float(np.float32(0.999))


def _alpha(lr: float, t: int) -> float:
    """alpha_t as TF1 computes it: float32 betas, powers accumulated by float32 products."""
    powers = [np.float32(B1), np.float32(B2)]
    for _ in range(t - 1):
        powers = [np.float32(p * np.float32(beta)) for p, beta in zip(powers, (B1, B2))]
    b1p, b2p = (float(p) for p in powers)
    return float(np.float32(lr)) * np.sqrt(1 - b2p) / (1 - b1p)


def _build(make_optimizer, sparse: bool = True):
    """A small graph: scalar, vector, matrix, an embedding with sparse gradients, a frozen
    variable; returns (optimizer, train_op, trained variables, gradient tensors, x)."""
    variables = {name: V1.get_variable(name, initializer=value) for name, value in INIT.items()}
    frozen = V1.get_variable("frozen", initializer=np.ones(3), trainable=False)
    x = V1.placeholder(tf.float64, (8, 4))
    hidden = tf.tanh(
        tf.matmul(x, variables["matrix"]) * variables["scalar"] + variables["vector"][:3]
    )
    loss = tf.reduce_sum((hidden * frozen) ** 2) + tf.reduce_sum(variables["vector"] ** 3)
    if sparse:
        variables["embedding"] = V1.get_variable("embedding", initializer=EMBEDDING)
        loss += tf.reduce_sum(tf.gather(variables["embedding"], [0, 3, 3]) ** 2)
    optimizer = make_optimizer()
    grads_and_vars = optimizer.compute_gradients(loss, var_list=list(variables.values()))
    train_op = optimizer.apply_gradients(
        grads_and_vars, global_step=V1.train.get_or_create_global_step()
    )
    grads = {v.op.name: tf.convert_to_tensor(g) for g, v in grads_and_vars}
    return optimizer, train_op, list(variables.values()), grads, x


def test_original_question_with_two_added_lines() -> None:
    """The TF1 user printed _lr_t and always saw 1e-3; step_size shows alpha_t."""
    with tf.Graph().as_default():
        w = V1.get_variable("w", initializer=np.array([1.0, -2.0], np.float32))
        loss = tf.reduce_sum(w * w)
        global_step = V1.train.get_or_create_global_step()
        optimizer = V1.train.AdamOptimizer(1e-3)
        grads_and_vars = optimizer.compute_gradients(loss)
        train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
        alpha = lrscope.tf1.step_size(optimizer)  # added line 1
        upcoming = lrscope.tf1.next_step_size(optimizer)
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            for t in range(1, 6):
                sess.run(train_op)
                assert sess.run(optimizer._lr_t) == pytest.approx(1e-3)
                assert sess.run(alpha) == pytest.approx(_alpha(1e-3, t), rel=1e-6)  # added line 2
                assert sess.run(upcoming) == pytest.approx(_alpha(1e-3, t + 1), rel=1e-6)
                # The formula with exact betas differs by TF1's float32 rounding only.
                assert sess.run(alpha) == pytest.approx(
                    lrscope.step_size("adam", t, lr=1e-3, convention="tf1"), rel=1e-4
                )


def _identity(before: np.ndarray, after: np.ndarray, eta: np.ndarray, d: np.ndarray) -> None:
    np.testing.assert_allclose(after - before, -eta * d, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("case", ["adam", "momentum", "rmsprop", "rmsprop_centered_momentum"])
def test_identity_direction_from_slots(case: str) -> None:
    """SPEC §5 on the real TF1 step, dense and sparse (IndexedSlices) gradients, float64."""
    make = {
        "adam": lambda: V1.train.AdamOptimizer(0.05),
        "momentum": lambda: V1.train.MomentumOptimizer(0.05, momentum=0.9),
        "rmsprop": lambda: V1.train.RMSPropOptimizer(0.01),
        "rmsprop_centered_momentum": lambda: V1.train.RMSPropOptimizer(
            0.01, momentum=0.5, centered=True
        ),
    }[case]
    # TF1 RMSProp moves only the touched rows of a sparse gradient: dense graph for it.
    with tf.Graph().as_default():
        optimizer, train_op, variables, _, x = _build(make, sparse=not case.startswith("rmsprop"))
        els = {v.op.name: lrscope.tf1.elementwise(optimizer, v) for v in variables}
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            for batch in INPUTS:
                before = sess.run({v.op.name: v for v in variables})
                sess.run(train_op, {x: batch})
                after = sess.run({v.op.name: v for v in variables})
                values = sess.run({k: (el.eta, el.direction) for k, el in els.items()})
                for name, (eta, d) in values.items():
                    _identity(before[name], after[name], eta, d)
            frozen = next(v for v in V1.global_variables() if v.op.name == "frozen")
            np.testing.assert_array_equal(sess.run(frozen), np.ones(3))


@pytest.mark.parametrize("case", ["sgd", "adagrad", "nesterov"])
def test_identity_eta_times_gradient(case: str) -> None:
    """Families without d in their slots: eta times the gradient of the same run."""
    make = {
        "sgd": lambda: V1.train.GradientDescentOptimizer(0.05),
        "adagrad": lambda: V1.train.AdagradOptimizer(0.05),
        "nesterov": lambda: V1.train.MomentumOptimizer(0.05, momentum=0.9, use_nesterov=True),
    }[case]
    with tf.Graph().as_default():
        optimizer, train_op, variables, grads, x = _build(make, sparse=False)
        etas = lrscope.tf1.effective_lr(optimizer, variables)
        slots = (
            {v.op.name: optimizer.get_slot(v, "momentum") for v in variables}
            if case == "nesterov"
            else {}
        )
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            for batch in INPUTS:
                before = sess.run({v.op.name: v for v in variables})
                _, g = sess.run([train_op, grads], {x: batch})
                after = sess.run({v.op.name: v for v in variables})
                eta, buffers = sess.run([etas, slots])
                for name in before:
                    # Nesterov: var -= lr * (g + momentum * accum_new).
                    d = g[name] + B1 * buffers[name] if case == "nesterov" else g[name]
                    _identity(before[name], after[name], eta[name], d)
            report = lrscope.inspect(optimizer, session=sess)
            assert report.groups[0].update_norm is None and report.notes


def test_adadelta_identity_and_monitor() -> None:
    """Adadelta's eta needs accum_update from before the step: fed here, recorded by watch."""
    with tf.Graph().as_default():
        optimizer, train_op, variables, grads, x = _build(
            lambda: V1.train.AdadeltaOptimizer(0.5), sparse=False)
        before_ph = {v.op.name: V1.placeholder(tf.float64, v.shape) for v in variables}
        etas = lrscope.tf1.effective_lr(optimizer, variables, acc_delta_before=before_ph)
        slots = {v.op.name: optimizer.get_slot(v, "accum_update") for v in variables}
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            monitor = lrscope.watch(optimizer, session=sess, sinks=[CollectSink()])
            assert lrscope.inspect(optimizer, session=sess).notes  # nothing recorded: said so
            for batch in INPUTS:
                before, accum_update = sess.run([{v.op.name: v for v in variables}, slots])
                _, g = sess.run([train_op, grads], {x: batch})
                after = sess.run({v.op.name: v for v in variables})
                eta = sess.run(etas, {before_ph[k]: accum_update[k] for k in before_ph})
                for name in before:
                    _identity(before[name], after[name], eta[name], g[name])
                report = monitor.step()
                all_eta = np.concatenate([e.ravel() for e in eta.values()])
                assert report.groups[0].effective_lr.min == all_eta.min()
                assert report.groups[0].effective_lr.max == all_eta.max()
            monitor.close()


def test_inspect_matches_numpy() -> None:
    with tf.Graph().as_default():
        optimizer, train_op, variables, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
        etas = lrscope.tf1.effective_lr(optimizer)
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            for batch in INPUTS[:3]:
                before = sess.run(variables)
                sess.run(train_op, {x: batch})
            after = sess.run(variables)
            report = lrscope.inspect(optimizer, session=sess)
            eta = np.concatenate([e.ravel() for e in sess.run(etas).values()])
            v = np.concatenate(
                [sess.run(optimizer.get_slot(var, "v")).ravel() for var in variables]
            )
    assert report.t == 3 and report.framework == "tf1" and report.optimizer == "AdamOptimizer"
    group = report.groups[0]
    assert group.lr == float(np.float32(0.01)) and group.step_size == pytest.approx(
        _alpha(0.01, 3), rel=1e-6
    )
    dist = group.effective_lr
    assert dist.count == eta.size and dist.min == eta.min() and dist.max == eta.max()
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert dist.quantile(q) == pytest.approx(np.quantile(eta, q), rel=0.01)
    # tf1 convention: eps on the raw sqrt(v).
    assert dist.eps_dominated == pytest.approx(np.mean(np.sqrt(v) < 1e-8))
    realized = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    assert group.update_norm == pytest.approx(realized, rel=1e-9)
    assert group.param_norm == pytest.approx(np.sqrt(sum((a**2).sum() for a in after)), rel=1e-12)
    assert set(group.params) == {v.op.name for v in variables}


def test_summaries_written_by_filewriter(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tf.Graph().as_default():
        optimizer, train_op, variables, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
        summary_op = lrscope.tf1.summaries(optimizer)
        alpha = lrscope.tf1.step_size(optimizer)
        with V1.Session() as sess:
            writer = V1.summary.FileWriter(str(tmp_path), sess.graph)
            sess.run(V1.global_variables_initializer())
            alphas = []
            for step, batch in enumerate(INPUTS, start=1):
                sess.run(train_op, {x: batch})
                summary, a = sess.run([summary_op, alpha])
                writer.add_summary(summary, step)
                alphas.append(a)
            writer.close()
            report = lrscope.inspect(optimizer, session=sess)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    scalars = [e.value for e in events.Scalars("lr-AdamOptimizer/pg0/step_size")]
    assert scalars == pytest.approx(alphas, rel=1e-6)
    assert [e.step for e in events.Scalars("lr-AdamOptimizer/pg0/lr")] == [1, 2, 3, 4]
    final = {
        name: events.Scalars(f"lr-AdamOptimizer/pg0/{name}")[-1].value
        for name in (
            "effective_lr/min",
            "effective_lr/mean",
            "effective_lr/max",
            "eps_dominated",
            "update_to_param",
        )
    }
    group = report.groups[0]
    expected = {
        "effective_lr/min": group.effective_lr.min,
        "effective_lr/mean": group.effective_lr.mean,
        "effective_lr/max": group.effective_lr.max,
        "eps_dominated": group.effective_lr.eps_dominated,
        "update_to_param": group.update_to_param,
    }
    assert final == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    assert {f"lr-AdamOptimizer/pg0/{v.op.name}/effective_lr" for v in variables} <= set(
        tags["histograms"]
    )


def _train(monitored: bool) -> list[np.ndarray]:
    with tf.Graph().as_default():
        optimizer, train_op, variables, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            sink = CollectSink()
            monitor = (
                lrscope.watch(optimizer, session=sess, sinks=[sink], every=2) if monitored else None
            )
            summary_op = lrscope.tf1.summaries(optimizer) if monitored else None
            for batch in INPUTS:
                sess.run(train_op, {x: batch})
                if monitor is not None:
                    monitor.step()
                    sess.run(summary_op)
            if monitor is not None:
                assert [r.t for r in sink.reports] == [1, 2, 3, 4]
                assert [r.groups[0].effective_lr is not None for r in sink.reports] == [
                    True,
                    False,
                ] * 2
                monitor.close()
            return sess.run(variables)


def test_monitor_does_not_change_training() -> None:
    for plain, monitored in zip(_train(False), _train(True)):
        np.testing.assert_array_equal(plain, monitored)


def test_a_failing_measurement_warns_once_and_training_goes_on(monkeypatch) -> None:
    """If measuring the distributions raises (an error injected into the statistics), the
    monitor warns once and reports the scalars from then on."""
    from lrscope.tf1 import stats as tf1_stats

    real = tf1_stats.param_reports

    def unforeseen(stats, shapes):
        if stats:
            raise RuntimeError("unforeseen variable type")
        return real(stats, shapes)

    monkeypatch.setattr(tf1_stats, "param_reports", unforeseen)
    with tf.Graph().as_default():
        optimizer, train_op, _, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            monitor = lrscope.watch(optimizer, session=sess, sinks=[CollectSink()])
            with pytest.warns(RuntimeWarning, match="distributions failed .*unforeseen") as record:
                for t, batch in enumerate(INPUTS, 1):
                    sess.run(train_op, {x: batch})
                    report = monitor.step()
                    assert report.t == t and report.groups[0].effective_lr is None
                    assert report.groups[0].step_size == pytest.approx(_alpha(0.01, t), rel=1e-6)
            monitor.close()
    assert len(record) == 1


def test_monitor_attached_mid_run_keeps_its_schedule() -> None:
    """Attached after 3 unwatched steps, with every=2: distributions on its 1st and 3rd
    step() calls, while t is the optimizer's own (4 to 7)."""
    with tf.Graph().as_default():
        optimizer, train_op, _, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            for batch in INPUTS[:3]:
                sess.run(train_op, {x: batch})
            monitor = lrscope.watch(optimizer, session=sess, sinks=[CollectSink()], every=2)
            reports = []
            for batch in np.concatenate([INPUTS, INPUTS])[3:7]:
                sess.run(train_op, {x: batch})
                reports.append(monitor.step())
            monitor.close()
    assert [r.t for r in reports] == [4, 5, 6, 7]
    assert [r.groups[0].effective_lr is not None for r in reports] == [True, False, True, False]


def test_monitored_training_session_finalizes_the_graph() -> None:
    """MonitoredTrainingSession finalizes the graph: without report_ops first, a clear error
    (it was TensorFlow's bare "Graph is finalized"); with it, watch reuses the ops."""
    for prepared in (False, True):
        with tf.Graph().as_default():
            optimizer, train_op, _, _, x = _build(lambda: V1.train.AdamOptimizer(0.01))
            if prepared:
                lrscope.tf1.report_ops(optimizer)
            with V1.train.MonitoredTrainingSession(checkpoint_dir=None) as sess:
                if not prepared:
                    with pytest.raises(RuntimeError, match=r"call lrscope\.tf1\.report_ops\(optimizer\)"):
                        lrscope.watch(optimizer, session=sess, sinks=[CollectSink()])
                    continue
                monitor = lrscope.watch(optimizer, session=sess, sinks=[CollectSink()])
                for batch in INPUTS[:3]:
                    sess.run(train_op, {x: batch})
                    report = monitor.step()
                monitor.close()
    assert report.t == 3 and report.groups[0].step_size == pytest.approx(_alpha(0.01, 3), rel=1e-6)
    assert report.groups[0].effective_lr.count > 0


def test_unsupported_optimizer_says_so() -> None:
    with tf.Graph().as_default():
        w = V1.get_variable("w", initializer=np.ones(2))
        optimizer = V1.train.FtrlOptimizer(1.0)
        optimizer.minimize(tf.reduce_sum(w * w))
        with pytest.raises(TypeError, match="FtrlOptimizer"):
            lrscope.tf1.step_size(optimizer)
        with V1.Session() as sess, pytest.raises(TypeError, match="FtrlOptimizer"):
            lrscope.inspect(optimizer, session=sess)
    with pytest.raises(TypeError, match="session"):
        lrscope.inspect(V1.train.AdamOptimizer(1e-3))
