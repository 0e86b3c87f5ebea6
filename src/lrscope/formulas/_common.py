"""Pieces shared by every optimizer family: conventions, hyperparameters, the result type.

A family module (``adam.py``, ``sgd.py``, ...) states its update rule once and exposes

* ``NAMES``: the names it answers to (``"adam"``, ``"adamw"``, ...),
* ``DEFAULTS``: ``{convention: {hyperparameter: default}}`` for each framework that has it,
* ``step_sizes(xp, t, h, convention) -> dict[str, value]``: the data-independent scalars
  (always ``"step_size"``, plus family extras such as NAdam's ``"step_size_grad"``),
* ``elementwise(xp, state, t, h, convention) -> Elementwise``: per-element eta and d;

and where it needs them

* ``CHUNKABLE = False``: eta needs whole tensors (a norm, a matrix shape);
* ``USES_STEP = False``: the formulas never read t;
* ``STATELESS = True``: the optimizer may keep no state for a tensor it moved;
* ``STEP_SCALARS``: hyperparameters that change every step (an adapted ``d``), which a
  reader passes with the state (``per_step``) so that compiled loops take them as
  arguments; ``PER_STEP``: the hyperparameters they are made of, which the formula then
  does not read from ``h`` (a reader may leave them out of the compiled loop's constants);
* ``decay_rate(h, step_size) -> float``: the fraction of theta decoupled decay removed
  (default: ``lr * weight_decay`` where ``decoupled_weight_decay``);
* ``unsupported(h) -> list[str]``: option values the formula does not model;
* ``IDENTITY_STATE``: the state entry whose change is ``-eta * d - decay`` where it is
  not the parameter's (schedule-free's ``"z"``).

``xp`` is the array namespace of the caller (``numpy``, ``torch``, ``tensorflow`` or
``jax.numpy``): formulas only use operators and ``xp.sqrt``/``xp.where``/``xp.sign``/
``xp.abs``/``xp.maximum``, which all four provide under the same names, so the one
formula runs on the framework's own device (and inside ``jit``).  ``t`` may be an int,
a numpy array (for curves) or a framework scalar (capturable / traced step counters).
``state`` maps PyTorch's state names (``exp_avg``, ``exp_avg_sq``, ...) plus ``param``
(theta after the step) and ``grad`` (the gradient the step received) to arrays; the
backends translate their framework's names into these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

CONVENTIONS = ("torch", "keras", "tf1", "optax")


@dataclass
class Elementwise:
    """The per-element form of one step: ``delta_theta = -eta * direction - decay_rate * theta_old``.

    ``eps_dominated`` is a boolean array (True where eps dominates the denominator)
    or None for families without an eps term in eta.  ``delta`` is the parameter's own
    change where eta and d describe another sequence (schedule-free's z, while the
    parameter holds an interpolation y); None where the parameter moves by
    ``-eta * d - decay_rate * theta``.
    """

    eta: Any
    direction: Any
    decay_rate: Any = 0.0
    eps_dominated: Any = None
    delta: Any = None

    def update(self, param_after: Any) -> Any:
        """delta_theta of the step, reconstructed from the state and theta after the step.

        theta_after = theta_before * (1 - decay_rate) - eta * d, so the parameters
        before the step never need to be copied.
        """
        if self.delta is not None:
            return self.delta
        step = self.eta * self.direction
        if is_zero(self.decay_rate):
            return -step
        theta_before = (param_after + step) / (1 - self.decay_rate)
        return -step - self.decay_rate * theta_before


def is_zero(value: Any) -> bool:
    """Whether ``value`` is a Python number equal to 0.  An array is never compared on the
    host: it may be an input of a compiled caller (a weight decay that changes every step),
    and a term multiplied by a zero array is zero anyway.

    >>> import numpy as np
    >>> is_zero(0.0), is_zero(0.1), is_zero(np.zeros(()))
    (True, False, False)
    """
    return isinstance(value, (int, float)) and value == 0


def power(state: Mapping[str, Any], h: Mapping[str, Any], name: str, t: Any) -> Any:
    """``h[name] ** t``, or ``state[name + "_power"]`` where the caller has it: a framework
    that accumulates the power in a variable (TF1), or a caller that computes it once per
    step rather than once per element of a compiled loop (``torch_state.host_scalars``).

    >>> power({}, {"beta1": 0.5}, "beta1", 3), power({"beta1_power": 0.25}, {}, "beta1", 3)
    (0.125, 0.25)
    """
    key = f"{name}_power"
    return state[key] if key in state else h[name] ** t


def per_step(state: Mapping[str, Any], h: Mapping[str, Any], name: str) -> Any:
    """``state[name]`` where the caller passes a per-step scalar with the state (as an
    argument of a compiled loop, which bakes the hyperparameters in as constants), else
    ``h[name]``.

    >>> per_step({"d": 2.0}, {"d": 1.0}, "d"), per_step({}, {"d": 1.0}, "d")
    (2.0, 1.0)
    """
    return state[name] if name in state else h[name]


def scaled_decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``decay_lr * weight_decay``: the decoupled decay of implementations that scale it by
    another lr than the step's (timm's ``corrected_weight_decay``, pytorch_optimizer's
    ``fixed_decay``, lion-pytorch's ``decoupled_weight_decay``); ``decay_lr`` None (or
    absent) means ``lr``.

    >>> scaled_decay_rate({"lr": 0.1, "weight_decay": 0.5, "decay_lr": None})
    0.05
    >>> scaled_decay_rate({"lr": 0.1, "weight_decay": 0.5, "decay_lr": 1.0})
    0.5
    """
    decay_lr = h.get("decay_lr")
    return (h["lr"] if decay_lr is None else decay_lr) * h["weight_decay"]


def bias_corrected(x: Any, bias: Any) -> Any:
    """``x / bias`` for a per-step scalar ``bias`` (a bias correction ``1 - beta**t``),
    computed as ``x`` times the reciprocal of ``bias``: within a unit in the last place of
    the division, and per element a multiplication, not a division (a CPU core divides, and
    takes square roots, on one unit, much slower than it multiplies).

    >>> bias_corrected(3.0, 0.5)
    6.0
    """
    if is_zero(bias):  # (beta = 1) the division's inf or NaN, not Python's ZeroDivisionError
        return x / bias
    return x * (1 / bias)


def second_moment_root(xp: Any, v: Any, bias2: Any, h: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(sqrt(v_hat), eps_hat)``, the two terms of an Adam-like denominator
    ``sqrt(v_hat) + eps_hat`` with ``v_hat = v / bias2``: torch's ``eps_hat = eps``, or, with
    ``h["raw_eps"]`` (pytorch_optimizer's ``(sqrt(v + eps_root) + eps) / sqrt(bias2)``),
    ``sqrt((v + eps_root) / bias2)`` and ``eps_hat = eps / sqrt(bias2)``.

    >>> import math
    >>> second_moment_root(math, 4.0, 0.25, {"eps": 0.1, "raw_eps": True, "eps_root": 0.0})
    (4.0, 0.2)
    """
    if not h.get("raw_eps"):
        return xp.sqrt(bias_corrected(v, bias2)), h["eps"]
    scale = bias2 ** 0.5
    return bias_corrected(xp.sqrt(v + h["eps_root"]), scale), h["eps"] / scale


def coupled_direction(
    xp: Any, param_after: Any, grad: Any, eta: Any, grad_coef: Any, rest: Any, weight_decay: float,
    maximize: bool = False,
) -> Any:
    """Direction ``d = grad_coef * (g + wd * theta_before) + rest`` for coupled (L2) decay.

    The step was ``theta_after = theta_before - eta * d``; solving for theta_before
    gives d without a copy of the parameters taken before the step.
    """
    g = -grad if maximize else grad
    if weight_decay == 0:
        return grad_coef * g + rest
    if param_after is None:
        raise ValueError("with coupled weight decay the direction needs the parameters: "
                         "pass params to the optimizer's update")
    theta_before = (param_after + eta * (grad_coef * g + rest)) / (1 - eta * grad_coef * weight_decay)
    return grad_coef * (g + weight_decay * theta_before) + rest


def resolve(
    family: str, defaults: Mapping[str, Mapping[str, Any]], convention: str, hyper: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge ``hyper`` over the convention's defaults; reject unknown names.

    ``betas=(b1, b2)`` is accepted as a spelling of ``beta1``/``beta2``.

    >>> resolve("adam", {"torch": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}}, "torch",
    ...         {"betas": (0.8, 0.99)})
    {'lr': 0.001, 'beta1': 0.8, 'beta2': 0.99}
    """
    if convention not in defaults:
        raise ValueError(
            f"{family!r} has no {convention!r} convention; choose one of {sorted(defaults)}"
        )
    hyper = dict(hyper)
    if "betas" in hyper:
        betas = hyper.pop("betas")
        try:
            hyper["beta1"], hyper["beta2"] = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    base = dict(defaults[convention])
    unknown = sorted(set(hyper) - set(base))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for {family!r} ({convention}); "
            f"known: {sorted(base)}"
        )
    base.update(hyper)
    for name in ("beta1", "beta2"):
        if name in base:
            try:
                value = float(base[name])
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number in [0, 1), got {base[name]!r}") from None
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {base[name]}")
    return base
