"""Run by test_optax_multiprocess.py: one of two JAX processes (``jax.distributed``, gloo on
the CPU), each with 2 host devices, training the monitored AdamW of ``_optax_sharded`` on
parameters sharded over all 4 devices of both processes.  Prints the report's statistics
as one JSON line, as seen by this process, after logging it with ``lrscope.watch`` to ``LOGS/pID`` (the
default: only process 0 writes) and ``LOGS/pID-own`` (``distributed=False``: each writes).

    python _optax_multiprocess.py PROCESS_ID PORT LOGS
"""

import json
import os
import sys


def main(process_id: int, port: str, logs: str) -> None:
    # (Set before jax loads; everything runs here, so that collecting this module imports nothing.)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sys.path.insert(0, os.path.dirname(__file__))
    from _optax_sharded import summary, train

    rng = np.random.default_rng(1)
    host = {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
            "bias": rng.normal(size=(32,)).astype(np.float32)}
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    # Each process places its own rows: make_array_from_callback asks for the local shards.
    params = {name: jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
              for name, a in host.items()}
    state = train(params)
    import lrscope

    for suffix, distributed in (("", None), ("-own", False)):
        monitor = lrscope.watch(state, log_dir=os.path.join(logs, f"p{process_id}{suffix}"),
                                distributed=distributed)
        monitor.log(state)
        monitor.close()
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "report": summary(state)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
