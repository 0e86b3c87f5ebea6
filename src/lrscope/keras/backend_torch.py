"""Keras 3 on torch: the statistics of lrscope's PyTorch backend for Keras variables.

On the torch backend a Keras variable and its optimizer's slots are torch tensors, so
they take the path ``torch.optim`` optimizers take: small tensors batched into one
formula call (``lrscope.torch.small``), large CPU tensors through one compiled kernel that also
counts the buckets (``lrscope.torch.fused``), a tensor holding NaN/Inf redone with masking
(``torch_stats.collect``).  Op by op with ``keras.ops`` the same statistics cost 2.3
times Keras' own ``optimizer.apply`` for 40 variables of 250K.  The formula is the
family's, with the Keras convention (``formulas/``).

Lamb and Adafactor stay op by op (``lrscope.keras.stats``): their formula needs whole tensors,
which the chunked passes do not give.  So does everything when ``LRSCOPE_FUSED=0``.
"""

from __future__ import annotations

from typing import Any

import torch

from lrscope import formulas
from lrscope._fast import fast_statistics
from lrscope.torch import fused as torch_fused, small as torch_small, stats as torch_stats
from lrscope.formulas import Elementwise
from lrscope.report import Distribution


def applies(family: str) -> bool:
    """Whether ``family``'s statistics are measured by ``collect``."""
    return formulas.chunkable(family) and fast_statistics()


def apply_keras(family: str, view: dict[str, Any], t: Any, h: dict[str, Any],
                dtype: torch.dtype) -> Elementwise:
    """The family's formula with the Keras convention (the ``apply`` of a ChunkedFormula:
    module level, so a compiled caller sees the same function for every variable)."""
    return formulas.family(family).elementwise(torch, view, t, h, "keras")


def _with_decay_input(h: dict[str, Any]) -> dict[str, Any]:
    """``h`` with a nonzero weight decay as a 0-d tensor: Keras on torch rounds ``1 - wd * lr``
    through float32, so the modelled decay changes with lr (``KerasReader.weight_decay``),
    and as a number it would be compiled into ``torch_fused``'s kernel, again every step."""
    if formulas.is_zero(h["weight_decay"]):
        return h
    return {**h, "weight_decay": torch.tensor(h["weight_decay"], dtype=torch.float64)}


def collect(family: str, states: list[dict[str, Any]], hypers: list[dict[str, Any]], t: int,
            with_update: bool) -> list[tuple[Distribution, float | None, float]]:
    """``(effective lr Distribution, update norm or None, param norm)`` per variable, like
    ``keras_stats.collect``; ``states`` and ``hypers`` as ``KerasReader.formula_inputs``
    gives them."""
    items, inputs = {}, {}
    for i, (state, h) in enumerate(zip(states, hypers)):
        # Keras' torch variables (and copies of them: ``param_before``) require grad.
        view = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        param = view["param"]
        # Without the gradient the formula still needs the key; eta does not depend on it.
        # A 0-d zero broadcasts like a zero tensor without writing one (40 variables of 250K:
        # zeros_like filled 40 MB per measurement, two thirds of its time).
        if view["grad"] is None:
            view["grad"] = torch.zeros((), dtype=param.dtype, device=param.device)
        # One dict per distinct hyperparameters: variables that share it share a formula call.
        if id(h) not in inputs:
            inputs[id(h)] = _with_decay_input(h)
        h = inputs[id(h)]
        items[str(i)] = (torch_fused.ChunkedFormula(apply_keras, family, view, float(t), h, param.dtype), param)
    out, _ = torch_stats.collect(torch_small.measures(items))
    return [(dist, update_norm if with_update else None, param_norm)
            for dist, update_norm, param_norm in (out[str(i)] for i in range(len(states)))]
