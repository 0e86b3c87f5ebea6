"""Run by test_optax.py in a subprocess with 4 host devices (XLA_FLAGS set before jax loads).

Trains the same monitored AdamW on parameters sharded over the 4 devices, on unsharded
ones, and under ``jax.pmap`` (state replicated on every device), and prints the reports'
statistics as one JSON line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lrscope
import lrscope.optax


def summary(state):
    report = lrscope.inspect(state)
    out = {"t": report.t, "lr": report.groups[0].lr, "step_size": report.groups[0].step_size}
    for name, param in sorted(report.groups[0].params.items()):
        dist = param.effective_lr
        out[name] = {"count": dist.count, "min": dist.min, "max": dist.max,
                     "mean": dist.mean, "p50": dist.quantile(0.5),
                     "eps_dominated": dist.eps_dominated_count,
                     "update_norm": param.update_norm, "param_norm": param.param_norm,
                     "keys": param.effective_lr.sketch.positive[0].tolist()}
    return out


def monitored():
    return lrscope.optax.monitor(optax.adamw, learning_rate=optax.cosine_decay_schedule(1e-2, 10),
                                 weight_decay=1e-2)


def train(params, tx=None):
    """Three jitted steps of ``tx`` (default ``monitored()``) on random gradients placed like
    ``params``; returns the state."""
    tx = monitored() if tx is None else tx
    state = tx.init(params)
    rng = np.random.default_rng(0)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        grads = jax.tree.map(lambda p: jax.device_put(
            jnp.asarray(rng.normal(size=p.shape), p.dtype), p.sharding), params)
        params, state = step(params, state, grads)
    return state


def train_pmap(params):
    """``train`` under jax.pmap: params and state replicated, the same gradients averaged."""
    tx = monitored()
    n = jax.local_device_count()
    replicated = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)  # noqa: E731
    rng = np.random.default_rng(0)

    def step(params, state, grads):
        updates, state = tx.update(jax.lax.pmean(grads, "devices"), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.pmap(step, axis_name="devices")
    params, state = replicated(params), replicated(tx.init(params))
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape[1:]), p.dtype), params)
        params, state = step(params, state, replicated(grads))
    return state


def main():
    rng = np.random.default_rng(1)
    host = {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
            "bias": rng.normal(size=(32,)).astype(np.float32)}
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharded = {"kernel": jax.device_put(host["kernel"], NamedSharding(mesh, PartitionSpec("x"))),
               "bias": jax.device_put(host["bias"], NamedSharding(mesh, PartitionSpec("x")))}
    plain = jax.tree.map(lambda a: jax.device_put(a, jax.devices()[0]), host)
    sharded_state = train(sharded)
    is_sharded = len(sharded_state.inner[0].nu["kernel"].sharding.device_set) == 4
    pmap_state = train_pmap(host)
    print(json.dumps({"devices": len(jax.devices()), "sharded": is_sharded,
                      "sharded_report": summary(sharded_state),
                      "unsharded_report": summary(train(plain)),
                      "pmap_report": summary(pmap_state),
                      "pmap_notes": lrscope.inspect(pmap_state).notes}))


if __name__ == "__main__":
    main()
