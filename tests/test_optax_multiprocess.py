"""JAX with several processes: the Optax monitor's statistics are global on every process.

Two ``jax.distributed`` processes on the CPU (gloo collectives), 2 host devices each, train
the monitored AdamW of ``_optax_sharded.py`` on parameters sharded over all 4 devices; each
process's report must equal the report of the same training in one process with the
parameters unsharded (bucket keys, extremes and counts exact; float32 sums up to the
order of the sharded reduction).  Only process 0 writes logs, unless ``distributed=False``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

require("optax")
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_two_processes_report_the_global_statistics(tmp_path):
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.Popen([sys.executable, str(HERE / "_optax_multiprocess.py"), str(i), port, str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p0", "p0-own", "p1-own"]
    for name in ("p0", "p0-own", "p1-own"):
        assert (tmp_path / name / "lrscope.jsonl").read_text().count("\n") == 1
    one = subprocess.run([sys.executable, str(HERE / "_optax_sharded.py")], capture_output=True, text=True,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    want = _last_json(one.stdout)["unsharded_report"]
    rounded = {"mean", "update_norm", "param_norm"}
    for out, _ in outputs:
        result = _last_json(out)
        assert result["processes"] == 2 and result["devices"] == 4
        got = result["report"]
        assert got["t"] == want["t"] == 3 and got["lr"] == want["lr"] and got["step_size"] == want["step_size"]
        for name in ("kernel", "bias"):
            for key, value in got[name].items():
                expected = want[name][key]
                assert value == (pytest.approx(expected, rel=1e-5) if key in rounded else expected), (name, key)
