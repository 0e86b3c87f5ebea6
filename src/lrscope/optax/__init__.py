"""lrscope for JAX and Optax: a jit-safe monitor that lives in the optimizer state.

``monitor(alias, **hyperparams)`` builds ``alias(**hyperparams)`` and wraps it: the
updates are exactly the alias's, and the state also holds the statistics of the step
just taken, computed inside ``jit`` with no host callback.  ``lrscope.inspect(state)``
turns them into a StepReport (one small device-to-host transfer); ``log(state, sinks)``
writes it to any lrscope sink, and ``mon = lrscope.watch(state, log_dir=...)`` gives a
monitor whose ``mon.log(state)`` writes each step once (TensorBoard and JSONL).
An ``nnx.Optimizer`` or a Flax ``TrainState`` (anything with ``.opt_state``) can be
passed wherever a state is expected.

>>> import jax, jax.numpy as jnp, optax, lrscope
>>> import lrscope.optax
>>> tx = lrscope.optax.monitor(optax.adamw, learning_rate=1e-3, weight_decay=1e-2)
>>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
>>> state = tx.init(params)
>>> grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}
>>> updates, state = jax.jit(tx.update)(grads, state, params)
>>> report = lrscope.inspect(state)
>>> report.t, round(report.groups[0].step_size, 7)
(1, 0.0003162)
>>> round(report.groups[0].effective_lr.max, 4)   # lr / (|g| + eps) at t = 1
0.002
>>> sorted(report.groups[0].params)
['b', 'w']
"""

from __future__ import annotations

from lrscope._optional import require

require("optax", "jax")

from lrscope.optax.reader import (  # noqa: E402 - after the dependency check
    OptaxMonitor, find_state, inspect, log, watch,
)
from lrscope.jax.stats import LeafStats  # noqa: E402
from lrscope.optax.transform import LrscopeState, monitor  # noqa: E402

__all__ = ["LeafStats", "LrscopeState", "OptaxMonitor", "find_state", "inspect", "log", "monitor",
           "watch"]
