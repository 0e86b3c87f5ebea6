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

from lrscope.formulas._common import Elementwise

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
}


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
    """``{"step_size": lr}``, or the adjusted lr of a matrix of ``h["shape"]``."""
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
    shape = state.get("shape") or tuple(state["param"].shape)
    return Elementwise(eta=adjusted_lr(h["lr"], shape, h["adjust_lr_fn"]),
                       direction=state["orthogonalized"], decay_rate=decay_rate(h))
