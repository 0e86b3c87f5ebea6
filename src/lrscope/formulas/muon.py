r"""Muon: momentum, orthogonalized by a Newton-Schulz iteration, one learning rate per matrix.

PyTorch (``torch.optim.Muon``, torch >= 2.9), step t for a matrix of shape (A, B)::

    B     <- lerp(B, g, 1 - momentum)                   # momentum_buffer
    u      = lerp(g, B, momentum) if nesterov else B
    O      = NS_k(u)                                    # k Newton-Schulz steps, in bfloat16
    theta <- theta * (1 - lr * wd)                      # decay with the *unadjusted* lr
    theta <- theta - adjusted_lr * O

so ``d = O`` (the orthogonalized update actually applied, bfloat16 values), ``eta`` is
one scalar per matrix, the adjusted lr::

    adjust_lr_fn None / "original":  eta = lr * sqrt(max(1, A / B))       (Keller Jordan)
    adjust_lr_fn "match_rms_adamw":  eta = lr * 0.2 * sqrt(max(A, B))     (Moonshot)

with ``A, B = shape[:2]`` of the *global* matrix (a shard's shape would give another
scale), and ``decay_rate = lr * wd``.  Other implementations scale differently (Keras
``0.2 * sqrt(max(n, m))`` by default, optax ``sqrt(max(1, fan_out / fan_in))``): the
convention names the implementation.

``O`` is not in the optimizer's state: the state hook (``lrscope.torch.models``) runs
the implementation's own Newton-Schulz function again on ``u``, rebuilt from the state
after the step (``momentum_buffer`` and ``grad``), which gives the step's ``O`` bit for
bit (same kernels, same inputs) at the cost of one more Newton-Schulz per measured step.
So eta, d and the update norm are computed, not measured.

Optax (``optax.contrib.muon``): the matrices (label ``"muon"``) take
``scale_by_muon`` (Nesterov by default: ``u = beta * m / (1 - beta**(t+1)) + (1 - beta)
* g / (1 - beta**t)``; ``preconditioning``, a tuple of coefficients per step, and
``adaptive``, ``O <- <u, O> O``, inside the step), ``scale_by_shape``,
``add_decayed_weights(wd, mask)`` and ``scale_by_learning_rate``::

    theta <- theta - lr * scale * O - lr * wd * theta
    scale  = sqrt(max(1, fan_out / fan_in))              (default)
           = consistent_rms * sqrt(max(fan_in, fan_out))  (consistent_rms given)

with fan_in, fan_out the products of the ``MuonDimensionNumbers`` reduction and output
axes (``state["fan_in"]``/``["fan_out"]``): ``eta = lr * scale`` (per matrix), ``d = O``
(``state["orthogonalized"]``, which the optax layer recomputes with optax's own
Newton-Schulz function), ``decay_rate = lr * wd``.  The other tensors (label
``"adam"``) take ``optax.adamw(..., nesterov=nesterov)``: NAdamW by default, modelled by
those families.

Keras (``keras.optimizers.Muon``) takes one of two rules per variable, as its
``update_step`` does: Muon for the variables with no ``adam_velocities`` slot (2-D, not
matched by ``exclude_layers``, not an embedding with ``exclude_embeddings``), Adam for the
others (``path`` "muon" / "adam"; lrscope reports them as two groups)::

    theta <- theta * (1 - lr * wd)                      # wd: weight_decay / adam_weight_decay
    muon:  m <- momentum * m + g;   u = g + momentum * m if nesterov else m
           theta <- theta - lr * rms_rate * sqrt(max(n, m)) * NS_k(u)
    adam:  theta <- theta - adam_lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)

so on the Muon path ``eta = lr * rms_rate * sqrt(max(n, m))`` (``rms_rate=None``: ``lr``;
Keras takes the square root in float32), ``d = NS_k(u)`` (``state["orthogonalized"]``, which
the Keras reader computes with the optimizer's own ``zeropower_via_newtonschulz5``), and
on the Adam path eta and d are Keras Adam's (``formulas.adam``, eps on the raw sqrt(v))
with ``adam_lr = lr * adam_lr_ratio`` (rounded in float32 as Keras multiplies it:
``state["adam_lr"]``).  Both decays use the *unscaled* lr: ``decay_rate = lr * wd``.
``step_size`` is ``lr`` on the Muon path (each matrix's adjusted lr is its eta) and Adam's
``adam_lr * sqrt(1 - b2**t) / (1 - b1**t)`` on the other.

``step_size`` is ``lr``, or the adjusted lr where ``shape`` is given
(``step_size("muon", 1, lr=0.02, shape=(1024, 256))``).  ``eps_dominated`` is None
(eps only guards the normalisation before the iteration).

>>> adjusted_lr(0.02, (1024, 256), None), adjusted_lr(0.02, (256, 1024), "original")
(0.04, 0.02)
>>> round(adjusted_lr(0.02, (1024, 256), "match_rms_adamw"), 6)
0.128
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from lrscope.formulas import adam
from lrscope.formulas._common import Elementwise, is_zero, per_step

NAMES = ("muon",)
#: Muon keeps no step counter: eta does not depend on t.
USES_STEP = False
#: eta depends on the whole matrix's shape, and ``O`` on the whole matrix.
CHUNKABLE = False
#: The ``adjust_lr_fn`` values of torch.optim.Muon (None means "original").
ADJUSTMENTS = (None, "original", "match_rms_adamw")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
              "ns_coefficients": (3.4445, -4.7750, 2.0315), "eps": 1e-7, "ns_steps": 5,
              "adjust_lr_fn": None, "shape": None},
    # keras.optimizers.Muon; ``path`` picks its rule for a variable ("muon" or "adam").
    "keras": {"lr": 1e-3, "weight_decay": 0.004, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
              "rms_rate": 0.2, "adam_beta1": 0.9, "adam_beta2": 0.999, "eps": 1e-7,
              "adam_weight_decay": 0.004, "adam_lr_ratio": 1.0, "adam_lr": None, "path": "muon"},
    # optax.contrib.muon's matrix part (see the module docstring).
    "optax": {"lr": None, "beta": 0.95, "eps": 1e-8, "ns_steps": 5, "nesterov": True,
              "adaptive": False, "preconditioning": "frobenius", "weight_decay": 0.0,
              "consistent_rms": None},
}


def optax_scale(fan_in: int, fan_out: int, consistent_rms: Any = None) -> Any:
    """optax's ``scale_by_shape`` factor of a matrix with these fans.

    >>> optax_scale(256, 1024), optax_scale(1024, 256), optax_scale(256, 1024, 0.2)
    (2.0, 1.0, 6.4)
    """
    if consistent_rms is None:
        return math.sqrt(max(1, fan_out / fan_in))
    return math.sqrt(max(fan_in, fan_out)) * consistent_rms


def adjusted_lr(lr: Any, shape: Sequence[int], adjust_lr_fn: str | None) -> Any:
    """The lr torch.optim.Muon applies to a matrix of ``shape`` (its ``_adjust_lr``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not one of {ADJUSTMENTS}")


def unsupported(h: Mapping[str, Any]) -> list[str]:
    """An ``adjust_lr_fn`` torch would treat as "no adjustment" silently (it only checks
    the constructor's argument): not modelled."""
    fn = h.get("adjust_lr_fn")
    return [] if fn in ADJUSTMENTS else [f"adjust_lr_fn={fn!r}"]


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``, or the adjusted lr of a matrix of ``h["shape"]``; Keras' Adam
    path: Adam's step size with ``adam_lr``."""
    if convention == "keras" and h["path"] == "adam":
        return adam.step_sizes(xp, t, _keras_adam_hyper(h, keras_adam_lr(h)), "keras")
    if h.get("shape") is None:
        return {"step_size": h["lr"]}
    return {"step_size": adjusted_lr(h["lr"], h["shape"], h["adjust_lr_fn"])}


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``lr * weight_decay`` (the unadjusted lr), as ``1 - (1 - lr * wd)``: the factor the
    step multiplies theta by, rounded as it rounds it (in float32 for a float32 Tensor lr)."""
    return 1 - (1 - h["lr"] * h["weight_decay"])


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = the adjusted lr of ``state["shape"]`` (the global matrix's), d =
    ``state["orthogonalized"]`` (O, in the parameter's dtype)."""
    if convention == "keras":
        return _keras_elementwise(xp, state, t, h)
    if convention == "optax":
        scale = optax_scale(state["fan_in"], state["fan_out"], h["consistent_rms"])
        return Elementwise(eta=h["lr"] * scale, direction=state["orthogonalized"],
                           decay_rate=h["lr"] * h["weight_decay"])
    shape = state.get("shape") or tuple(state["param"].shape)
    return Elementwise(eta=adjusted_lr(h["lr"], shape, h["adjust_lr_fn"]),
                       direction=state["orthogonalized"], decay_rate=decay_rate(h))


def keras_adjusted_lr(lr: Any, shape: Sequence[int], rms_rate: Any) -> Any:
    """The lr keras.optimizers.Muon applies to a matrix of ``shape`` (its ``lr_adjust``:
    ``sqrt(max(n, m))`` in float32, times ``rms_rate``; None: no adjustment).

    >>> round(keras_adjusted_lr(0.02, (1024, 256), 0.2), 6), keras_adjusted_lr(0.02, (4, 3), None)
    (0.128, 0.02)
    """
    if rms_rate is None:
        return lr
    return lr * float(np.float32(math.sqrt(max(shape[0], shape[1])))) * rms_rate


def keras_adam_lr(h: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> Any:
    """The lr of Keras Muon's Adam path: ``state["adam_lr"]`` (as the step rounded it) or
    ``h["adam_lr"]`` where given, else ``lr * adam_lr_ratio``."""
    given = per_step(state or {}, h, "adam_lr")
    return h["lr"] * h["adam_lr_ratio"] if given is None else given


def _keras_adam_hyper(h: Mapping[str, Any], adam_lr: Any) -> dict[str, Any]:
    """Keras Adam's hyperparameters of Muon's Adam path (its decay is Muon's: see below)."""
    return {"lr": adam_lr, "beta1": h["adam_beta1"], "beta2": h["adam_beta2"], "eps": h["eps"],
            "amsgrad": False, "weight_decay": 0.0, "decoupled_weight_decay": True}


def _keras_elementwise(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """Keras Muon: the Muon rule (``path`` "muon") or Keras Adam's (``path`` "adam"), each
    with its decay on the unscaled lr."""
    if h["path"] == "adam":
        el = adam.elementwise(xp, state, t, _keras_adam_hyper(h, keras_adam_lr(h, state)), "keras")
        wd = h["adam_weight_decay"]
        el.decay_rate = 0.0 if is_zero(wd) else h["lr"] * wd
        return el
    wd = h["weight_decay"]
    return Elementwise(eta=keras_adjusted_lr(h["lr"], tuple(state["param"].shape), h["rms_rate"]),
                       direction=state["orthogonalized"], decay_rate=0.0 if is_zero(wd) else h["lr"] * wd)
