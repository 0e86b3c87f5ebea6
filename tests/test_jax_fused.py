"""The compiled pass of ``lrscope.jax.fused`` against numpy and the XLA path, family by family.

Each optax case of ``test_optax`` runs real steps on tensors of a few thousand elements,
monitored without the model check (the compiled pass, where the formula translates) and
again with ``fused.statistics`` switched off (XLA computes eta, ``lrscope.jax.kernel``
counts it), in float32 (and a few in float64).  The compiled pass computes each
operation correctly rounded; XLA:CPU rewrites ``a / sqrt(b)`` as ``a * rsqrt(b)``, an
approximation in float32, so the two agree within two units in the last place of eta: the
extremes to that tolerance, the bucket counts but for an element within two units of a
bucket's edge, the eps-dominated counts exactly, sums and norms to float tolerance.  Against
numpy, which rounds each operation too, the compiled eta is exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("numba")
import jax.numpy as jnp  # noqa: E402

import lrscope  # noqa: E402
import lrscope.optax  # noqa: E402
from lrscope.jax import fused, kernel  # noqa: E402
from lrscope.stats import LogSketch, mapping  # noqa: E402

from tests.test_optax import CASES, _kwargs, xla_statistics_only  # noqa: E402

SHAPES = {"w": (40, 50), "b": (50,), "v": (3000,)}


def _steps(tx, dtype, steps=3):
    rng = np.random.default_rng(7)
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        # gradients over several decades, and exact zeros: eps-dominated elements
        grads = {k: jnp.asarray(rng.normal(size=s) * rng.lognormal(sigma=3, size=s)
                                * (rng.random(s) > 0.05), dtype) for k, s in SHAPES.items()}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return state


def _compiled_calls(tx, dtype):
    """How many tensors the compiled pass measured while ``tx``'s step was traced."""
    calls = []
    real = fused.statistics

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        return out

    fused.statistics = counting
    try:
        _steps(tx, dtype, steps=1)
    finally:
        fused.statistics = real
    return len(calls)


#: The cases also run in float64 (``jax_enable_x64``).
WIDE = ("adam", "rmsprop", "lion", "sgd-momentum", "adadelta")
MATRIX = [pytest.param(*case, np.float32, id=f"{case[0]}-float32") for case in CASES] + [
    pytest.param(*case, np.float64, id=f"{case[0]}-float64") for case in CASES if case[0] in WIDE]


@pytest.mark.parametrize("case_id, alias, kwargs, dtype", MATRIX)
def test_compiled_statistics_equal_those_of_xla(case_id, alias, kwargs, dtype, monkeypatch):
    assert kernel.available()
    with jax.enable_x64(dtype == np.float64):
        kwargs = _kwargs(alias, kwargs)
        if "mask" in kwargs or "weight_decay_mask" in kwargs:
            kwargs = {**kwargs, **{k: None for k in ("mask", "weight_decay_mask") if k in kwargs}}
        make = lambda: lrscope.optax.monitor(alias, check=False, **kwargs)  # noqa: E731
        compiled = lrscope.inspect(_steps(make(), dtype))

        xla_statistics_only(monkeypatch)
        xla = lrscope.inspect(_steps(make(), dtype))
    for group_c, group_x in zip(compiled.groups, xla.groups):
        for name, c in group_c.params.items():
            x = group_x.params[name]
            dc, dx = c.effective_lr, x.effective_lr
            assert (dc is None) == (dx is None)
            if dc is None:
                continue
            where = f"{case_id} {name}"
            sc, sx = dc.sketch, dx.sketch
            assert (sc.count, sc.zeros, sc.nan, dc.eps_dominated_count) == (
                sx.count, sx.zeros, sx.nan, dx.eps_dominated_count), where
            ulps = 2 * float(np.finfo(dtype).eps)
            assert sc.min == pytest.approx(sx.min, rel=ulps) and sc.max == pytest.approx(sx.max, rel=ulps), where
            moved = sum(np.abs(_dense(getattr(sc, side)) - _dense(getattr(sx, side))).sum()
                        for side in ("positive", "negative"))
            assert moved <= 2, where  # an element at a bucket's edge, counted in its neighbour
            assert dc.mean == pytest.approx(dx.mean, rel=1e-5), where
            assert c.update_norm == pytest.approx(x.update_norm, rel=1e-5), where
            assert c.param_norm == pytest.approx(x.param_norm, rel=1e-5), where


def _dense(store):
    keys, counts = store
    out = np.zeros(1 << 17, np.int64)
    np.add.at(out, np.asarray(keys, np.int64) + (1 << 16), counts)
    return out


def test_compiled_eta_is_the_formula_rounded_operation_by_operation():
    """RMSProp's eta = lr / sqrt(nu + eps) from the real state, computed by numpy (each
    operation correctly rounded), has the compiled pass's extremes and buckets exactly,
    where XLA's own ``lr * rsqrt(nu + eps)`` differs in the last place of some elements."""
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=20000), jnp.float32)}
    tx = lrscope.optax.monitor(optax.rmsprop, learning_rate=1e-2, check=False)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    grads = {"w": jnp.asarray(rng.normal(size=20000) * rng.lognormal(sigma=3, size=20000), jnp.float32)}
    _, state = jax.jit(tx.update)(grads, state, params)
    nu = np.asarray(state.inner[0].nu["w"])
    eta = np.float32(1e-2) / np.sqrt(nu + np.float32(1e-8))
    dist = lrscope.inspect(state).groups[0].params["w"].effective_lr
    assert (dist.min, dist.max) == (eta.min(), eta.max())
    buckets = np.bincount(eta.view(np.uint32) >> mapping.FLOAT32_SHIFT, minlength=mapping.FLOAT32_BUCKETS)
    expected = LogSketch.from_float32_buckets(buckets, min=0.0, max=0.0, sum=0.0, sum_squares=0.0)
    np.testing.assert_array_equal(_dense(dist.sketch.positive), _dense(expected.positive))
    xla = np.asarray(jax.jit(lambda nu: jnp.float32(1e-2) / jnp.sqrt(nu + jnp.float32(1e-8)))(nu))
    assert not np.array_equal(xla, eta)  # what the XLA path would have counted


def _adam_report(grads, steps=2):
    params = {"w": jnp.zeros(3000, jnp.float32)}
    tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-2, check=False)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(steps):
        _, state = update(grads, state, params)
    w = lrscope.inspect(state).groups[0].params["w"]
    return {**w.effective_lr.to_dict(), "update_norm": w.update_norm, "param_norm": w.param_norm}


@pytest.mark.parametrize("nans", [2, 3000])
def test_a_step_with_values_that_are_not_finite_has_the_statistics_of_the_finite_ones(monkeypatch, nans):
    """A NaN gradient makes eta NaN: the compiled pass counts the NaNs in their bucket and
    takes the extremes and sums of the finite values (its second loop), as the XLA path
    does, on that step (none finite: min inf, max -inf, mean NaN); the update norm is NaN
    in both."""
    g = np.random.default_rng(3).normal(size=3000).astype(np.float32)
    g[np.random.default_rng(4).permutation(3000)[:nans]] = np.nan
    compiled = _adam_report({"w": jnp.asarray(g)})
    xla_statistics_only(monkeypatch)
    xla = _adam_report({"w": jnp.asarray(g)})
    assert compiled["sketch"]["nan"] == xla["sketch"]["nan"] == nans
    assert compiled["count"] == xla["count"] == 3000
    assert (compiled["min"], compiled["max"]) == (xla["min"], xla["max"])  # Adam's eta: the same rounding
    if nans == 3000:
        assert (compiled["min"], compiled["max"]) == (np.inf, -np.inf) and np.isnan(compiled["mean"])
    else:  # summed in another order
        assert np.isfinite(compiled["mean"]) and compiled["mean"] == pytest.approx(xla["mean"], rel=1e-6)
    assert np.isnan(compiled["update_norm"]) and np.isnan(xla["update_norm"])


def test_a_kernel_that_does_not_compile_warns_once_and_xla_measures(monkeypatch):
    def broken(source, name):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(fused.compiled, "compile_kernel", broken)
    monkeypatch.setattr(fused, "_targets", {})  # no kernel compiled by an earlier test
    grads = {"w": jnp.asarray(np.random.default_rng(4).normal(size=3000), jnp.float32)}
    with pytest.warns(RuntimeWarning, match="compiling the Optax statistics .* failed .*no LLVM here"):
        failed = _adam_report(grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _adam_report(grads, steps=1)  # remembered: no second warning, no second try
    xla_statistics_only(monkeypatch)
    assert failed == _adam_report(grads)


def test_buckets_beyond_a_tensors_own_go_to_the_shared_store_and_past_kept_are_counted(monkeypatch):
    """Each tensor's pass keeps its first ``KEPT`` nonzero buckets: those beyond its own
    ``PER_TENSOR`` go to the group's shared store, with the XLA path's counts; a tensor's
    buckets past ``KEPT`` are counted, and the report's note says how many are missing
    (here 4 own, 8 kept: "narrow" fills 6 buckets, "wide" 1 or hundreds)."""
    from lrscope.jax import compact

    monkeypatch.setattr(compact, "PER_TENSOR", 4)
    monkeypatch.setattr(compact, "KEPT", 8)
    rng = np.random.default_rng(5)
    params = {"narrow": jnp.zeros(600, jnp.float32), "wide": jnp.zeros(3000, jnp.float32)}
    grads = {"narrow": jnp.asarray(np.repeat(2.0 ** np.arange(6), 100), jnp.float32),
             "wide": jnp.asarray(rng.normal(size=3000) * rng.lognormal(sigma=3, size=3000), jnp.float32)}

    def report(fill_wide):
        g = dict(grads, wide=grads["wide"] if fill_wide else jnp.ones(3000, jnp.float32))
        tx = lrscope.optax.monitor(optax.adam, learning_rate=1e-2, check=False)
        _, state = jax.jit(tx.update)(g, tx.init(params), params)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            report = lrscope.inspect(state)
        dense = {name: _dense(p.effective_lr.sketch.positive) for name, p in report.groups[0].params.items()}
        return dense, report.notes

    for fill_wide in (False, True):
        compiled, notes = report(fill_wide)
        with monkeypatch.context() as off:
            xla_statistics_only(off)
            xla, xla_notes = report(fill_wide)
        assert not xla_notes
        np.testing.assert_array_equal(compiled["narrow"], xla["narrow"])
        filled = np.flatnonzero(xla["wide"])
        if not fill_wide:
            assert len(filled) == 1 and not notes
            np.testing.assert_array_equal(compiled["wide"], xla["wide"])
            continue
        first = np.zeros_like(xla["wide"])
        first[filled[:8]] = xla["wide"][filled[:8]]  # the first 8 in bucket order
        np.testing.assert_array_equal(compiled["wide"], first)
        assert any(f"{len(filled) - 8} nonzero buckets' counts are missing" in n for n in notes), notes
