r"""LAMB (You et al., 2020): Adam's update scaled per tensor by a trust ratio.

keras (``keras.optimizers.Lamb``): decoupled weight decay first (``decay_rate = lr * wd``),
then, with ``theta_mid`` the decayed parameters::

    m_hat = m / (1 - beta1**t),   v_hat = v / (1 - beta2**t)
    U     = m_hat / (sqrt(v_hat) + eps)             # eps on sqrt(v_hat), unlike Keras Adam
    r     = ||theta_mid|| / ||U||                   # per tensor; 1 where either norm is 0
    theta <- theta_mid - r * lr * U

so ``d = m_hat`` and ``eta = r * lr / (sqrt(v_hat) + eps)``.  The state holds theta
*after* the step; ``r`` is recovered without a copy of the parameters from
``||theta_after + r * lr * U|| = r * ||U||``, a quadratic in r whose positive root is
the trust ratio (for lr < 1)::

    (1 - lr**2) ||U||**2 r**2 - 2 lr <theta_after, U> r - ||theta_after||**2 = 0

optax (``optax.lamb``: ``scale_by_adam``, ``add_decayed_weights``,
``scale_by_trust_ratio``, ``scale_by_learning_rate``): the decay is inside the scaled
update and the ratio uses theta *before* the step (``param_before`` in the state; the
optax wrapper has it)::

    u     = m_hat / (sqrt(v_hat + eps_root) + eps) + wd * theta_before
    r     = ||theta_before|| / ||u||                # 1 where either norm is 0
    theta <- theta_before - lr * r * u

so ``eta = lr * r / (sqrt(v_hat + eps_root) + eps)`` and ``decay_rate = lr * r * wd``.

torch (``timm.optim.Lamb``): with ``bias_correction`` (else both corrections are 1)
``U = m_hat / (sqrt(v_hat) + eps)``; the trust ratio applies where ``weight_decay != 0``
or ``always_adapt`` (else r = 1), and ``trust_clip`` caps it at 1:

* ``decoupled_decay=True``: as keras (``decay_rate = decay_lr * wd``, ``decay_lr`` None
  meaning lr; timm's ``corrected_weight_decay`` ``lr**2 / max_lr``), the same quadratic.
* the default, decay in the update: ``u = U + wd * theta_before``, ``r = ||theta_before||
  / ||u||``, ``theta <- theta_before - lr * r * u``, so ``eta = lr * r / (sqrt(v_hat) +
  eps)``, ``decay_rate = lr * r * wd`` (per tensor).  From theta after the step,
  ``r * ||U + wd * theta_after|| = ||theta_after + lr * r * U||``, a quadratic in r::

      (||U + wd theta_after||**2 - lr**2 ||U||**2) r**2 - 2 lr <theta_after, U> r - ||theta_after||**2 = 0

  and ``theta_before = (theta_after + lr * r * U) / (1 - lr * r * wd)``.  Where the first
  coefficient is negative the quadratic has two positive roots; the step's is the smaller
  (the other has ``lr * r * wd > 1``, a decay that would flip theta's sign).

pytorch_optimizer's ``Lamb`` keeps the ratio its step used in ``state["trust_ratio"]``
(``||theta|| / (||u|| + eps)``, ``||theta||`` capped at 10): where the state has it, r is
read, not solved for.  Its step multiplies the update by ``lr / (1 - beta1**t)`` and
corrects neither moment otherwise: its model passes that lr with ``bias_correction=False``
(so ``d = m``), and its decoupled decay's lr as ``decay_lr``.

With ``trust_clip`` the step used r = 1 where the unclipped ratio of theta before would
be at least 1 (lrscope checks it with r = 1), else the root.  The global gradient-norm
clip (``max_grad_norm``) and ``grad_averaging`` act inside m and v.

``step_size`` is ``lr``: the rest of the scale (trust ratio, bias corrections) is per
tensor and lives in eta.  ``eps_dominated`` where ``sqrt(v_hat) < eps``.  Uses
``xp.sum`` besides the common operations (TensorFlow: pass ``tf.experimental.numpy``).

>>> import numpy as np
>>> h = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0}
>>> theta, g = np.array([3.0, 4.0]), np.array([1.0, -1.0])
>>> m, v = 0.1 * g, 0.001 * g**2
>>> update = (m / 0.1) / (np.sqrt(v / 0.001) + 1e-6)
>>> after = theta - 0.01 * np.linalg.norm(theta) / np.linalg.norm(update) * update
>>> el = elementwise(np, {"exp_avg": m, "exp_avg_sq": v, "param": after}, 1, h, "keras")
>>> np.allclose(after - theta, -el.eta * el.direction)
True

Against the real ``optax.lamb`` (two steps, weight decay):

>>> import jax.numpy as jnp, optax
>>> tx = optax.lamb(0.1, weight_decay=0.01)
>>> theta = jnp.array([3.0, -4.0, 0.5]); state = tx.init(theta)
>>> for g in (jnp.array([1.0, -1.0, 0.2]), jnp.array([0.5, 2.0, -1.0])):
...     updates, state = tx.update(g, state, theta)
...     before, theta = theta, optax.apply_updates(theta, updates)
>>> adam = state[0]
>>> h = {**DEFAULTS["optax"], "lr": 0.1, "weight_decay": 0.01}
>>> el = elementwise(jnp, {"exp_avg": adam.mu, "exp_avg_sq": adam.nu, "param_before": before,
...                         "param": theta}, 2, h, "optax")
>>> bool(jnp.allclose(theta - before, -el.eta * el.direction - el.decay_rate * before, rtol=1e-5))
True
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected

NAMES = ("lamb",)
#: eta needs whole-tensor norms (the trust ratio): not computable chunk by chunk.
CHUNKABLE = False
#: The optax convention reads theta before the step in eta or d, so it cannot be
#: recovered from theta after the step through the model (see lrscope/optax/transform.py).
READS_PARAM_BEFORE = True

DEFAULTS: dict[str, dict[str, Any]] = {
    "keras": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0},
    "optax": {"lr": None, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "eps_root": 0.0,
              "weight_decay": 0.0},
    "torch": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01,
              "bias_correction": True, "grad_averaging": True, "max_grad_norm": 1.0,
              "trust_clip": False, "always_adapt": False, "decoupled_decay": False, "decay_lr": None},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}`` (the trust ratio is per tensor)."""
    return {"step_size": h["lr"]}


def positive_root(xp: Any, a: Any, b: Any, c: Any) -> Any:
    """The positive root of ``a r**2 - 2 b r - c = 0`` (a > 0, c >= 0); 1 where a <= 0.

    >>> import numpy as np
    >>> float(positive_root(np, 1.0, 1.0, 3.0))
    3.0
    """
    root = xp.sqrt(b * b + a * c)
    # Both forms are the positive root; each is free of cancellation for one sign of b.
    safe_a = xp.where(a > 0, a, 1 + 0 * a)
    safe_gap = xp.where(root - b > 0, root - b, 1 + 0 * b)
    ratio = xp.where(b > 0, (b + root) / safe_a, c / safe_gap)
    return xp.where(a > 0, ratio, 1 + 0 * ratio)


def trust_ratio(xp: Any, param_after: Any, update: Any, lr: Any) -> Any:
    """The trust ratio r of the step, from theta after it and the unscaled update U."""
    return positive_root(
        xp,
        (1 - lr**2) * xp.sum(update * update),
        lr * xp.sum(param_after * update),
        xp.sum(param_after * param_after),
    )


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """The fraction of theta the decay removed: ``lr * wd`` (keras, optax before its trust
    ratio); torch: ``decay_lr * wd`` where decoupled, else ``lr * wd`` times each tensor's
    trust ratio (reported per tensor, NaN for the group)."""
    if "decoupled_decay" not in h:
        return h["lr"] * h["weight_decay"]
    if h["weight_decay"] == 0:
        return 0.0
    if h["decoupled_decay"]:
        return (h["lr"] if h["decay_lr"] is None else h["decay_lr"]) * h["weight_decay"]
    return float("nan")


def _smaller_root(xp: Any, a: Any, b: Any, c: Any) -> Any:
    """The smallest positive root of ``a r**2 - 2 b r - c = 0`` (c >= 0), for any sign of
    a; 1 where there is none.  With decay in the update, ``a`` may be negative: then a
    second root has ``lr * r * wd > 1`` (a decay flipping theta's sign), not the step's."""
    root = xp.sqrt(xp.maximum(b * b + a * c, 0 * a))
    safe_a = xp.where(a != 0, a, 1 + 0 * a)
    safe_gap = xp.where(root - b > 0, root - b, 1 + 0 * b)
    ratio = xp.where(b > 0, (b + root) / safe_a, c / safe_gap)
    return xp.where((b > 0) & (a <= 0) | (b <= 0) & (root - b <= 0), 1 + 0 * ratio, ratio)


def _torch(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """timm's Lamb (see the module docstring)."""
    bias1, bias2 = (1 - h["beta1"] ** t, 1 - h["beta2"] ** t) if h["bias_correction"] else (1, 1)
    lr, wd, after = h["lr"], h["weight_decay"], state["param"]
    m_hat = bias_corrected(state["exp_avg"], bias1)
    root = bias_corrected(xp.sqrt(state["exp_avg_sq"]), bias2**0.5)
    denom = root + h["eps"]
    update = m_hat / denom
    coupled = wd != 0 and not h["decoupled_decay"]
    if "trust_ratio" in state:  # pytorch_optimizer keeps the ratio its step used
        ratio = state["trust_ratio"]
    elif wd == 0 and not h["always_adapt"]:
        ratio = 1.0
    elif coupled:
        decayed = update + wd * after
        ratio = _smaller_root(xp, xp.sum(decayed * decayed) - lr**2 * xp.sum(update * update),
                              lr * xp.sum(after * update), xp.sum(after * after))
        if h["trust_clip"]:
            grown = after + lr * update  # theta before with r = 1, times (1 - lr * wd)
            ratio = xp.where(xp.sum(grown * grown) >= xp.sum(decayed * decayed), 1 + 0 * ratio,
                             ratio)
    else:
        ratio = trust_ratio(xp, after, update, lr)
        if h["trust_clip"]:
            grown = after + lr * update  # theta after the decay with r = 1
            ratio = xp.where(xp.sum(grown * grown) >= xp.sum(update * update), 1 + 0 * ratio, ratio)
    rate = lr * ratio * wd if coupled else decay_rate(h)
    return Elementwise(eta=ratio * lr / denom, direction=m_hat, decay_rate=rate,
                       eps_dominated=root < h["eps"])


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``, ``exp_avg_sq`` and ``param`` (theta after the step;
    optax: ``param_before``, theta before it)."""
    if convention == "torch":
        return _torch(xp, state, t, h)
    v_hat = state["exp_avg_sq"] / (1 - h["beta2"] ** t)
    m_hat = state["exp_avg"] / (1 - h["beta1"] ** t)
    lr, eps, wd = h["lr"], h["eps"], h["weight_decay"]
    if convention == "optax":
        before = state.get("param_before")
        if before is None:
            raise ValueError("optax lamb: the trust ratio needs theta before the step "
                             "(state['param_before'])")
        root = xp.sqrt(v_hat + h["eps_root"])
        update = m_hat / (root + eps) + wd * before
        param_norm = xp.sqrt(xp.sum(before * before))
        update_norm = xp.sqrt(xp.sum(update * update))
        safe_norm = xp.where(update_norm > 0, update_norm, 1 + 0 * update_norm)
        ratio = xp.where((param_norm > 0) & (update_norm > 0), param_norm / safe_norm,
                         1 + 0 * param_norm)
        return Elementwise(eta=lr * ratio / (root + eps), direction=m_hat,
                           decay_rate=lr * ratio * wd, eps_dominated=root < eps)
    root = xp.sqrt(v_hat)
    ratio = trust_ratio(xp, state["param"], m_hat / (root + eps), lr)
    return Elementwise(eta=ratio * lr / (root + eps), direction=m_hat,
                       decay_rate=lr * wd, eps_dominated=root < eps)
