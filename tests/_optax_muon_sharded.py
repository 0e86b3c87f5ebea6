"""Run by test_optax_contrib.py in a subprocess with 4 host devices (XLA_FLAGS set before
jax loads): optax.contrib.muon on a (16, 64) matrix sharded over the 4 devices along its
output axis (a shard is 16 x 16, scale 1; the matrix's scale is sqrt(64 / 16) = 2), and
unsharded; prints each run's eta and model check as one JSON line.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lrscope
import lrscope.optax

sys.path.insert(0, os.path.dirname(__file__))
from _optax_sharded import train as train_sharded  # noqa: E402


def train(params):
    tx = lrscope.optax.monitor(optax.contrib.muon, learning_rate=1e-2, weight_decay=0.1, check=True)
    state = train_sharded(params, tx)
    report = lrscope.inspect(state)
    muon = next(g for g in report.groups if g.name == "muon")
    kernel = muon.params["kernel"]
    return {"eta_min": kernel.effective_lr.min, "eta_max": kernel.effective_lr.max,
            "model_error": muon.extra["model_error"], "update_norm": kernel.update_norm,
            "shard_shape": list(params["kernel"].addressable_shards[0].data.shape)}


def main():
    rng = np.random.default_rng(1)
    host = {"kernel": rng.normal(size=(16, 64)).astype(np.float32),
            "bias": rng.normal(size=(64,)).astype(np.float32)}
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharded = {"kernel": jax.device_put(host["kernel"], NamedSharding(mesh, PartitionSpec(None, "x"))),
               "bias": jax.device_put(host["bias"], NamedSharding(mesh, PartitionSpec("x")))}
    print(json.dumps({"devices": len(jax.devices()), "sharded": train(sharded),
                      "unsharded": train(jax.tree.map(jnp.asarray, host))}))


if __name__ == "__main__":
    main()
