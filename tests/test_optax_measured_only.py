"""SPEC §6: a group lrscope cannot model is reported measured-only, never mis-modelled.

When a state lrscope recognises sits inside (or beside) a transformation it does not
know (a custom one; schedule-free's ``ScheduleFreeState`` and Muon's ``MuonState`` in a
transformation built by hand, modelled through their aliases only), or
when the model check refutes the model (a stateless transformation that rescales the
update), the group is reported measured-only: the statistics of the realized update
(``update_magnitude``, update and parameter norms, as in empirical mode), unknown
scalars NaN, one warning; and every parameter tensor appears in the report.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lrscope  # noqa: E402
import lrscope.optax  # noqa: E402
from lrscope.optax.model import leaf_names, leaves  # noqa: E402
from tests.test_optax import SCHEDULE, _grads, _run  # noqa: E402

ALL = ["dense/bias", "dense/kernel", "frozen", "scale"]
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _lrscope_warnings(record) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("lrscope")]


def _assert_measured(group, updates, after, rel=1e-9):
    """``group`` is measured-only and its statistics are those of the real ``updates``
    (theta after the step: ``after``), tensor by tensor and merged."""
    names = leaf_names(updates)
    real = {n: np.abs(np.asarray(u, np.float64)).ravel() for n, u in zip(names, leaves(updates))}
    theta = {n: np.asarray(p, np.float64) for n, p in zip(leaf_names(after), leaves(after))}
    assert group.effective_lr is None and group.update_magnitude is not None
    assert math.isnan(group.step_size) and math.isnan(group.weight_decay_rate)
    for name, param in group.params.items():
        values, dist = real[name], param.update_magnitude
        assert param.effective_lr is None and dist is not None, name
        assert dist.count == values.size, name
        assert dist.min == pytest.approx(values.min(), rel=rel, abs=1e-300), name
        assert dist.max == pytest.approx(values.max(), rel=rel, abs=1e-300), name
        assert dist.mean == pytest.approx(values.mean(), rel=rel, abs=1e-300), name
        for q in QUANTILES:
            assert dist.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.01), (name, q)
        assert param.update_norm == pytest.approx(np.linalg.norm(values), rel=rel), name
        assert param.param_norm == pytest.approx(np.linalg.norm(theta[name]), rel=1e-9), name
    merged = np.concatenate([real[n] for n in group.params]) if group.params else None
    if merged is not None:
        assert group.update_magnitude.count == merged.size
        assert group.update_magnitude.max == pytest.approx(merged.max(), rel=rel)
        assert group.update_norm == pytest.approx(np.linalg.norm(merged), rel=rel)


def _measured_run(tx, steps=3):
    """Real steps with ``tx``; (history, report of the last step, lrscope's warnings)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _run(tx, _grads(steps))
        report = lrscope.inspect(history[-1][3])
    return history, report, _lrscope_warnings(record)


def test_built_schedule_free_is_measured_only(x64):
    """A schedule_free transformation built by hand keeps its base optimizer's state (here a
    ScaleByRmsWithCountState) inside its ScheduleFreeState: it was modelled as RMSprop, its
    eta 17-81x off.  Only the aliases say what the base optimizer is (tests/test_optax_contrib.py)."""
    tx = lrscope.optax.monitor(optax.contrib.schedule_free_adamw(1e-2), learning_rate=1e-2)
    history, report, warned = _measured_run(tx)
    assert len(warned) == 1 and "ScheduleFreeState" in warned[0]
    (group,) = report.groups
    assert report.empirical and report.family is None and sorted(group.params) == ALL
    assert group.lr == pytest.approx(1e-2)
    _, after, updates, _ = history[-1]
    _assert_measured(group, updates, after)
    assert any("ScheduleFreeState" in note and "measured-only" in note for note in report.notes)


def test_built_schedule_free_in_flax_nnx_optimizer_is_measured_only(x64):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = nnx.Optimizer(model, lrscope.optax.monitor(
            optax.contrib.schedule_free_sgd(1e-2), learning_rate=1e-2), wrt=nnx.Param)
    x = jnp.ones((4, 3))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(2):
        before = {"bias": np.asarray(model.bias.value), "kernel": np.asarray(model.kernel.value)}
        step(model, optimizer)
    after = {"bias": np.asarray(model.bias.value), "kernel": np.asarray(model.kernel.value)}
    report = lrscope.inspect(optimizer)
    assert len(_lrscope_warnings(record)) == 1
    (group,) = report.groups
    assert report.t == 2 and sorted(group.params) == ["bias", "kernel"]
    _assert_measured(group, {k: after[k] - before[k] for k in after}, after, rel=1e-6)


def test_built_muon_matrices_are_measured_only(x64):
    """optax.contrib.muon built by hand: the matrices (label "muon", MuonState: its dimension
    numbers are the alias's arguments) were dropped from the report, and its Adam part
    (label "adam": NAdam, muon's nesterov=True) was modelled as Adam (model_error 0.38, a
    note only): both groups are measured-only, a warning each.  The alias is modelled
    (tests/test_optax_contrib.py)."""
    history, report, warned = _measured_run(lrscope.optax.monitor(optax.contrib.muon(1e-2),
                                                                 learning_rate=1e-2))
    assert len(warned) == 2
    assert "group muon" in warned[0] and "MuonState" in warned[0] and "group adam" in warned[1]
    groups = {g.name: g for g in report.groups}
    assert sorted(groups) == ["adam", "muon"] and report.empirical and report.family is None
    assert sorted(groups["muon"].params) == ["dense/kernel", "frozen"]  # the 2-D tensors
    assert sorted(groups["adam"].params) == ["dense/bias", "scale"]
    assert groups["adam"].extra["model_error"] > 0.1
    _, after, updates, _ = history[-1]
    for group in report.groups:
        _assert_measured(group, updates, after)


def test_muon_adam_part_told_its_family_is_modelled(x64):
    tx = optax.contrib.muon(1e-2)
    history, report, warned = _measured_run(lrscope.optax.monitor(
        tx, learning_rate=1e-2, groups={"adam": {"family": "nadam"}}))
    assert len(warned) == 1 and "MuonState" in warned[0]
    groups = {g.name: g for g in report.groups}
    adam, muon = groups["adam"], groups["muon"]
    assert adam.effective_lr is not None
    assert adam.extra["model_error"] < 1e-9 and not math.isnan(adam.step_size)
    assert sorted(muon.params) == ["dense/kernel", "frozen"]
    _, after, updates, _ = history[-1]
    _assert_measured(muon, updates, after)


class _CountState(NamedTuple):
    count: jax.Array


def _scale_by_inverse_count() -> optax.GradientTransformation:
    """A transformation lrscope does not know, with a state of its own: u / (count + 2)."""

    def update(updates, state, params=None):
        del params
        scale = 1.0 / (state.count + 2.0)
        return jax.tree.map(lambda u: u * scale, updates), _CountState(state.count + 1)

    return optax.GradientTransformation(lambda params: _CountState(jnp.zeros([], jnp.int32)), update)


def _halve() -> optax.GradientTransformation:
    """A stateless transformation (EmptyState, like optax.scale) that rescales the update."""
    return optax.stateless(lambda updates, params: jax.tree.map(lambda u: 0.5 * u, updates))


@pytest.mark.parametrize("unknown, per_param", [(_scale_by_inverse_count, True),
                                                (_halve, True), (_halve, False)],
                         ids=["stateful", "stateless", "stateless-per-group"])
def test_unknown_rescaling_in_a_chain_is_measured_only(x64, unknown, per_param):
    """chain(scale_by_adam(), <unknown rescaling>, scale(-lr)): a stateful unknown is seen
    in the state (warning at init), a stateless one by the model check (warning with the
    report, whose note gives the mismatch)."""
    tx = optax.chain(optax.scale_by_adam(), unknown(), optax.scale(-1e-2))
    history, report, warned = _measured_run(lrscope.optax.monitor(tx, learning_rate=1e-2,
                                                                 per_param=per_param))
    assert len(warned) == 1
    (group,) = report.groups
    assert report.empirical and report.family is None
    assert sorted(group.params) == (ALL if per_param else [])
    _, after, updates, _ = history[-1]
    _assert_measured(group, updates, after)
    if unknown is _halve:
        assert group.extra["model_error"] > 0.1
        assert any("does NOT reproduce" in n and "measured-only" in n for n in report.notes)


def test_a_refuted_model_is_measured_only_between_distributions(x64):
    """every=2: the steps without distributions keep the last ones, and the refutation."""
    tx = optax.chain(optax.scale_by_adam(), _halve(), optax.scale(-1e-2))
    history = _run(lrscope.optax.monitor(tx, learning_rate=1e-2, every=2), _grads(2))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        report = lrscope.inspect(history[-1][3])
    group = report.groups[0]
    assert group.effective_lr is None and math.isnan(group.step_size)


def test_leaves_no_optimizer_state_covers_are_reported(x64):
    """chain(masked(adam), masked(sgd)): Adam's state covers the kernel only; the others are
    updated by stateless SGD: they appear, measured-only, in a group of their own."""
    mask = {"dense": {"kernel": True, "bias": False}, "scale": False, "frozen": False}
    tx = optax.chain(optax.masked(optax.adam(1e-2), mask),
                     optax.masked(optax.sgd(1e-3), jax.tree.map(lambda m: not m, mask)))
    history, report, warned = _measured_run(lrscope.optax.monitor(tx, learning_rate=1e-2))
    assert len(warned) == 1
    modelled, rest = report.groups
    assert modelled.name == "pg0" and list(modelled.params) == ["dense/kernel"]
    assert modelled.effective_lr is not None and modelled.extra["model_error"] < 1e-9
    assert rest.name == "unmodelled" and sorted(rest.params) == ["dense/bias", "frozen", "scale"]
    assert math.isnan(rest.lr)
    _, after, updates, _ = history[-1]
    _assert_measured(rest, updates, after)


def test_multi_transform_label_without_state_is_reported(x64):
    """A multi_transform label whose transformation keeps no state (set_to_zero) is a
    measured-only group holding the tensors no other group's state covers."""
    tx = optax.multi_transform({"train": optax.adam(SCHEDULE), "frozen": optax.set_to_zero()},
                               {"dense": {"kernel": "train", "bias": "train"}, "scale": "train",
                                "frozen": "frozen"})
    history, report, warned = _measured_run(lrscope.optax.monitor(tx, learning_rate=SCHEDULE))
    train, frozen = report.groups
    assert train.name == "train" and train.effective_lr is not None
    assert frozen.name == "frozen" and list(frozen.params) == ["frozen"] and len(warned) == 1
    assert frozen.update_magnitude.max == 0 and frozen.update_norm == 0


def test_an_unchecked_chain_says_its_stateless_transformations_are_assumed(x64):
    """check=False on a transformation you built: a stateless rescaling cannot be seen (no
    state, no check): the report says eta rests on that assumption."""
    tx = optax.chain(optax.scale_by_adam(), _halve(), optax.scale(-1e-2))
    report = lrscope.inspect(_run(lrscope.optax.monitor(tx, learning_rate=1e-2, check=False),
                                  _grads(2))[-1][3])
    assert any("check is off" in note and "nothing verifies eta" in note for note in report.notes)
    aliased = lrscope.inspect(_run(lrscope.optax.monitor(optax.adam, learning_rate=1e-2,
                                                         check=False), _grads(2))[-1][3])
    assert not aliased.notes
