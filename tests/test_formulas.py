"""Data-independent step sizes against closed forms written here, independently."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lrscope
from lrscope import formulas

TS = (1, 2, 3, 5, 6, 10, 100, 1000)


def adam_alpha(t, lr=1e-3, b1=0.9, b2=0.999):
    return lr * math.sqrt(1 - b2**t) / (1 - b1**t)


@pytest.mark.parametrize("convention", ["torch", "keras", "tf1", "optax"])
@pytest.mark.parametrize("t", TS)
def test_adam(convention, t):
    assert lrscope.step_size("adam", t, lr=1e-3, convention=convention) == pytest.approx(adam_alpha(t), rel=1e-12)
    assert lrscope.step_size("adamw", t, lr=2e-3, betas=(0.8, 0.99), convention=convention) == pytest.approx(
        adam_alpha(t, 2e-3, 0.8, 0.99), rel=1e-12)


def test_adam_famous_numbers():
    # alpha_1 = lr * sqrt(0.001) / 0.1; the dip near t = 10 at about 0.15 lr.
    assert lrscope.step_size("adam", 1, lr=1.0) == pytest.approx(math.sqrt(0.001) / 0.1)
    curve = lrscope.step_size_curve("adam", 100, lr=1.0)
    assert 9 <= int(np.argmin(curve)) + 1 <= 13
    assert 0.15 <= curve.min() <= 0.155


def test_nadam_conventions():
    b1, b2, lr, psi = 0.9, 0.999, 1e-3, 0.004
    for convention, mu in (
        ("torch", lambda i: b1 * (1 - 0.5 * 0.96 ** (i * psi))),
        ("keras", lambda i: b1 * (1 - 0.5 * 0.96**i)),
    ):
        product = 1.0
        for t in range(1, 30):
            product *= mu(t)
            on_m = lr * math.sqrt(1 - b2**t) * mu(t + 1) / (1 - product * mu(t + 1))
            on_g = lr * math.sqrt(1 - b2**t) * (1 - mu(t)) / (1 - product)
            got = formulas.step_sizes("nadam", t, convention, lr=lr)
            assert got["step_size"] == pytest.approx(on_m, rel=1e-12)
            assert got["step_size_grad"] == pytest.approx(on_g, rel=1e-12)
            curve = lrscope.step_size_curve("nadam", 29, lr=lr, convention=convention, term="step_size_grad")
            assert curve[t - 1] == pytest.approx(on_g, rel=1e-12)
    for t in (1, 7):
        got = formulas.step_sizes("nadam", t, "optax", lr=lr)
        assert got["step_size"] == pytest.approx(lr * math.sqrt(1 - b2**t) * b1 / (1 - b1 ** (t + 1)))
        assert got["step_size_grad"] == pytest.approx(lr * math.sqrt(1 - b2**t) * (1 - b1) / (1 - b1**t))


def radam_reference(t, lr, b1, b2, strict):
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if (rho > 5) if strict else (rho >= 5):
        r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        return lr * r * math.sqrt(1 - b2**t) / (1 - b1**t)
    return lr / (1 - b1**t)


@pytest.mark.parametrize("t", range(1, 12))
def test_radam_both_regimes(t):
    assert lrscope.step_size("radam", t, lr=1e-3) == pytest.approx(radam_reference(t, 1e-3, 0.9, 0.999, True))
    assert lrscope.step_size("radam", t, lr=1e-3, convention="optax") == pytest.approx(
        radam_reference(t, 1e-3, 0.9, 0.999, False))
    # Un-rectified up to t = 5 with the usual beta2, rectified from t = 6.
    unrectified = lrscope.step_size("radam", t, lr=1e-3) == pytest.approx(1e-3 / (1 - 0.9**t))
    assert unrectified == (t <= 5)


def test_other_families():
    t = np.arange(1, 50)
    cases = {
        ("adamax", "torch"): (dict(lr=2e-3), 2e-3 / (1 - 0.9**t)),
        ("adagrad", "torch"): (dict(lr=0.1, lr_decay=0.01), 0.1 / (1 + (t - 1) * 0.01)),
        ("adagrad", "keras"): (dict(lr=0.1), np.full(t.shape, 0.1)),
        ("asgd", "torch"): (dict(lr=0.1, lambd=0.01, alpha=0.75), 0.1 / (1 + 0.01 * 0.1 * (t - 1)) ** 0.75),
        ("adafactor", "torch"): (dict(lr=0.3), np.minimum(0.3, 1 / np.sqrt(t))),
        ("adafactor", "optax"): (dict(lr=0.3), np.full(t.shape, 0.3)),
        ("rmsprop", "torch"): (dict(lr=0.01), np.full(t.shape, 0.01)),
        ("sgd", "keras"): (dict(lr=0.01), np.full(t.shape, 0.01)),
        ("lion", "optax"): (dict(lr=1e-4), np.full(t.shape, 1e-4)),
        ("adadelta", "torch"): (dict(), np.full(t.shape, 1.0)),
    }
    for (name, convention), (hyper, expected) in cases.items():
        got = lrscope.step_size_curve(name, len(t), convention=convention, **hyper)
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"{name} ({convention})")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'; choose one of"):
        lrscope.step_size("adamm", 1)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        lrscope.step_size("adam", 1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="must be >= 1"):
        lrscope.step_size("adam", 0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        lrscope.step_size("adam", 1, momentum=0.9)
    with pytest.raises(ValueError, match="no 'tf1' convention"):
        lrscope.step_size("lion", 1, lr=1e-3, convention="tf1")
    with pytest.raises(ValueError, match="pass lr="):
        lrscope.step_size("adam", 1, convention="optax")
