"""Keras 3 on JAX: the statistics of every variable of a step in one jitted computation.

Op by op, every ``keras.ops`` call on JAX is a small XLA computation dispatched from
Python: the family's formula and the statistics of 40 variables of 250K cost 2.8 times
Keras' own ``optimizer.apply``.  Here the formula (``formulas/``, Keras convention) and
the statistics are traced together into one XLA computation: ``jax_stats.leaf_stats``,
the code that measures Optax steps inside ``jit``, on the CPU one block of variables at a
time (``jax_stats.by_blocks``: temporary memory bounded by the block, not the model).
It compiles once per model (variable shapes and dtypes, family, hyperparameters other
than lr); t, lr and the state (NAdam's ``mu_product`` included) are inputs, so neither a
new step nor a schedule compiles again.  Its reductions leave NaN/Inf out in the one
pass, so no variable is measured twice.

Adafactor stays op by op (``keras_stats``): its formula reads the RMS of theta as a
Python float.  So does everything when ``LRSCOPE_FUSED=0``, as on PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lrscope import formulas
from lrscope._fast import fast_statistics
from lrscope.jax import stats as jax_stats
from lrscope.report import Distribution

#: Families whose formula needs a concrete value (a Python float of an array).
OP_BY_OP = {"adafactor"}


def applies(family: str) -> bool:
    """Whether ``family``'s statistics are measured by ``collect``."""
    return family not in OP_BY_OP and fast_statistics()


@functools.partial(jax.jit, static_argnames=("family", "hypers"))
def _statistics(states: list[dict[str, Any]], t: jax.Array, lr: jax.Array, family: str,
                hypers: tuple[tuple[tuple[str, Any], ...], ...]) -> jax_stats.LeafStats:
    """The LeafStats of every variable, stacked; ``states[i]`` holds its state in PyTorch
    names, ``param`` (after the step) and ``grad`` (None: not given), ``hypers[i]`` its
    hyperparameters but lr, as sorted items (static: a change compiles again)."""
    module = formulas.family(family)

    def measure(state: dict[str, Any], hyper: tuple[tuple[str, Any], ...]) -> jax_stats.LeafStats:
        arrays = {k: v for k, v in state.items() if k not in ("param", "grad")}
        param = state["param"]
        # Without the gradient the formula still needs the key; eta does not depend on it.
        grad = jnp.zeros_like(param) if state["grad"] is None else state["grad"]
        h = {**dict(hyper), "lr": lr}
        return jax_stats.leaf_stats(module, arrays, t, h, grad, None, param, False, "keras")[0]

    measures = [functools.partial(measure, s, h) for s, h in zip(states, hypers)]
    return jax_stats.by_blocks(measures, [s["param"].size for s in states])


def collect(family: str, states: list[dict[str, Any]], hypers: list[dict[str, Any]], t: int,
            with_update: bool) -> list[tuple[Distribution, float | None, float]]:
    """``(effective lr Distribution, update norm or None, param norm)`` per variable, like
    ``keras_stats.collect``; ``states`` and ``hypers`` as ``KerasReader.formula_inputs``
    gives them (Python numbers in a state become inputs, not constants)."""
    if not states:
        return []
    lr = hypers[0]["lr"]
    arrays = [{k: jnp.asarray(v) if isinstance(v, float) else v for k, v in s.items()} for s in states]
    static = tuple(tuple(sorted((k, v) for k, v in h.items() if k != "lr")) for h in hypers)
    stats = jax.device_get(_statistics(arrays, jnp.asarray(t), jnp.asarray(lr), family, static))
    out = []
    for row in jax_stats.unstack_stats(stats):
        dist, update_norm, param_norm = jax_stats.decode(row)
        out.append((dist, update_norm if with_update else None, param_norm))
    return out
