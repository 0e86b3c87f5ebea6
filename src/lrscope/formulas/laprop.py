r"""LaProp (Ziyin et al., 2020): Adam's normalisation applied to the gradient before the momentum.

``timm.optim.LaProp``, step t (the tensor's ``state["step"]``), with ``lr_t`` the lr of
the step and the two scalar bias corrections the state keeps (``exp_avg_lr_1``: an EMA of
the lr, ``lr * (1 - beta1**t)`` for a constant lr; ``exp_avg_lr_2 = 1 - beta2**t``)::

    v <- beta2 * v + (1 - beta2) * g**2                       # exp_avg_sq
    denom = sqrt(v / exp_avg_lr_2) + eps                       # default eps 1e-15
    m <- beta1 * m + (1 - beta1) * lr_t * g / denom            # exp_avg (lr inside m)
    theta <- theta - (lr_t / exp_avg_lr_1) * m
    theta <- theta * (1 - decay_lr * wd)                       # decay *after* the update

As for ADOPT (``lrscope.formulas.adopt``) the per-element rate acts on the gradient before
the momentum; lrscope writes the step with the rate of *this* step's gradient::

    eta = (1 - r) * lr_t / denom,    d = m * denom / exp_avg_lr_1,    r = decay_lr * wd

``d`` is the bias-corrected momentum in gradient units (Adam's ``m_hat`` if v did not
change), and ``eta * d`` is exactly the step.  The decay comes after the update, so it
also shrinks the update: hence ``1 - r`` in eta, and ``decay_rate = r``.  ``decay_lr``:
None means ``lr``; timm's ``corrected_weight_decay`` ``lr**2 / max_lr``.  ``step_size``
is ``lr_t / exp_avg_lr_1 * sqrt(1 - beta2**t)`` for a constant lr (Adam's alpha_t), and
``eps_dominated`` where ``sqrt(v_hat) < eps``.

``pytorch_optimizer.LaProp`` (t in ``group["step"]``) takes the same steps with two
differences, which its model passes: eps is added to ``sqrt(v + 1e-15)`` before the bias
correction (``raw_eps``, ``eps_root``: ``denom = (sqrt(v + eps_root) + eps) / sqrt(1 -
beta2**t)``), and on its batched path (``foreach``, the default) it rounds each tensor's
``lr_t / exp_avg_lr_1`` to float32 before multiplying m by it (``float32_step_size``: its
state hook, on the host, passes ``exp_avg_lr_1`` as ``lr_t`` over that rounded step size).

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 0.01}
>>> round(float(step_sizes(np, 1, h, "torch")["step_size"]), 6)    # lr * sqrt(0.001) / 0.1
0.003162
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas import adam
from lrscope.formulas._common import Elementwise, scaled_decay_rate as decay_rate, second_moment_root

NAMES = ("laprop",)

#: Adam's alpha_t (LaProp's, for a constant lr): ``lr * sqrt(1 - beta2**t) / (1 - beta1**t)``.
step_sizes = adam.step_sizes

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 4e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-15, "weight_decay": 0.0,
              "decay_lr": None, "raw_eps": False, "eps_root": 0.0,
              "float32_step_size": False},  # (read by pytorch_optimizer's state hook)
}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``, ``exp_avg_sq``, ``exp_avg_lr_1`` and ``exp_avg_lr_2``."""
    root, eps_hat = second_moment_root(xp, state["exp_avg_sq"], state["exp_avg_lr_2"], h)
    denom = root + eps_hat
    lr_average = state["exp_avg_lr_1"]
    # lr_average is 0 only while every lr was 0, and then m is 0 too (the step is 0).
    safe = lr_average + (lr_average == 0)
    rate = decay_rate(h)
    return Elementwise(eta=(1 - rate) * h["lr"] / denom, direction=state["exp_avg"] * denom / safe,
                       decay_rate=rate, eps_dominated=root < eps_hat)
