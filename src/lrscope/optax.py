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

from typing import Any

from lrscope._optional import require

require("optax", "jax")

from lrscope.backends.optax import (  # noqa: E402 - after the dependency check
    LeafStats, LrscopeState, OptaxMonitor, find_state, inspect, log, watch,
)
from lrscope.backends.optax import monitor as _monitor  # noqa: E402


def monitor(optimizer: Any, /, *, every: int = 1, check: bool | None = None, per_param: bool = True,
            keep_arrays: bool = False, family: str | None = None,
            groups: dict[str, dict[str, Any]] | None = None, **hyperparams: Any) -> Any:
    """``optimizer`` (an optax alias, or a transformation) whose state carries lrscope's statistics.

    * ``monitor(optax.adamw, learning_rate=schedule, weight_decay=1e-2)``: the alias is
      called with ``hyperparams``; its family and every hyperparameter (defaults from
      the alias's signature) are known, so eta is modelled exactly.
    * ``monitor(tx)`` on a transformation you built (``optax.chain(...)``,
      ``inject_hyperparams``, ``masked``, ``multi_transform``): the optimizer is found by
      the type of its state (``ScaleByAdamState``, ...), one report group per
      ``multi_transform`` label; the lr comes from ``inject_hyperparams`` or from
      ``learning_rate=``; other hyperparameters (``b1``, ``b2``, ``eps``, ...; optax
      names) may be passed and are otherwise assumed at optax's defaults, which the
      report's notes say.  ``family="nadam"`` picks a family the state cannot tell;
      ``groups={"head": {"learning_rate": 1e-2, "momentum": 0.9}}`` gives one
      ``multi_transform`` label its own hyperparameters (over the common ones).

    Every step the state records ``t``, the lr the step used (schedules are evaluated
    at ``count - 1``, as optax does), the step size and the weight-decay rate; every
    ``every`` steps (``jax.lax.cond``) the per-tensor eta distribution, the
    eps-dominated count, the update and parameter norms and ``model_error``, the
    relative mismatch between lrscope's ``-eta * d - decay * theta`` and the real
    update (a built-in check that the model describes this optimizer).  By default
    (``check=None``) the check runs for transformations you built, whose model rests on
    assumed hyperparameters, and not for aliases, whose model is exact: without it the
    real update need not be kept for the statistics (the norms come from the model),
    which makes the steps between distributions nearly free.  ``check=True`` or
    ``False`` forces it.  The state keeps 32768 bucket counts (128 KiB) per
    tensor; ``per_param=False`` keeps one set per group instead (group distributions
    only, no per-tensor ones), for models with very many tensors.
    ``keep_arrays=True`` also keeps eta and d per tensor in the state (for debugging
    and tests: two more copies of the parameters).

    Options lrscope does not model (a non-default ``bias_correction_nu``, an alias
    without a formula) switch to empirical statistics of the real update, with a
    warning and a note.  See the module docstring for an example.
    """
    return _monitor(optimizer, every=every, check=check, per_param=per_param,
                    keep_arrays=keep_arrays, family=family, groups=groups, **hyperparams)


__all__ = ["LeafStats", "LrscopeState", "OptaxMonitor", "find_state", "inspect", "log", "monitor",
           "watch"]
