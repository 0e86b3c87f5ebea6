"""DeepSpeed ZeRO stages 1, 2 and 3 on two CPU processes (gloo): rank 0's report of the model
equals the one-process report of the same state, which DeepSpeed's own API reassembles
(``safe_get_full_optimizer_state``, ``safe_get_full_fp32_param``: whole tensors, gathered
by a collective) into a plain AdamW.

DeepSpeed steps one flat fp32 partition per group on each rank; lrscope maps it back to the
model's parameters (``lrscope.torch.deepspeed``).  DeepSpeed's CPU accelerator compiles a
shared-memory allreduce (a C++ extension, minutes on this machine) when its communication
starts; the ranks here replace that builder with DeepSpeed's own fallback (None: plain
torch.distributed collectives), which is what runs where the extension cannot be built.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
pytest.importorskip("deepspeed")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402

STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 6))


def _batches():
    torch.manual_seed(1)
    return [(torch.randn(16, 8), torch.randn(16, 6)) for _ in range(STEPS)]


def _rank(rank: int, port: int, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import importlib

    import deepspeed

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": stage}}
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    reports = []
    with lrscope.watch(zero, model=engine, every=1, findings=False) as monitor:
        for x, y in _batches():
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
            reports.append(monitor.last)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # Every rank joins DeepSpeed's gathers; rank 0 rebuilds the whole state in a plain AdamW.
    full = {name: (safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                   safe_get_full_optimizer_state(p, "exp_avg_sq"))
            for name, p in engine.module.named_parameters()}
    if rank == 0:
        reference = _model()
        plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
        for name, p in reference.named_parameters():
            theta, m, v = full[name]
            with torch.no_grad():
                p.copy_(theta.reshape(p.shape))
            p.grad = torch.zeros_like(p)
            plain.state[p] = {"step": torch.tensor(float(STEPS)), "exp_avg": m.reshape(p.shape).clone(),
                              "exp_avg_sq": v.reshape(p.shape).clone()}
        with open(os.path.join(out, "result.pkl"), "wb") as handle:
            pickle.dump({"report": reports[-1], "reference": lrscope.inspect(plain, model=reference)}, handle)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_rank_zero_reports_the_whole_model(tmp_path, stage):
    torch.multiprocessing.spawn(_rank, args=(_free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    result = pickle.loads((tmp_path / "result.pkl").read_bytes())
    got, want = result["report"], result["reference"]
    model = _model()

    assert got.t == want.t == STEPS
    assert any("merged from 2 ranks" in note for note in got.notes)
    group, whole = got.groups[0], want.groups[0]
    assert group.step_size == pytest.approx(whole.step_size, rel=1e-12)
    assert sorted(group.params) == sorted(whole.params)
    for name, param in whole.params.items():
        mine = group.params[name]
        assert mine.shape == param.shape
        assert mine.effective_lr.count == param.effective_lr.count
        for a, b in zip(mine.effective_lr.sketch.positive, param.effective_lr.sketch.positive):
            np.testing.assert_array_equal(a, b)  # bucket counts identical
        assert mine.effective_lr.min == pytest.approx(param.effective_lr.min, rel=1e-6)
        assert mine.effective_lr.max == pytest.approx(param.effective_lr.max, rel=1e-6)
        assert mine.update_norm == pytest.approx(param.update_norm, rel=1e-5)
        assert mine.param_norm == pytest.approx(param.param_norm, rel=1e-5)
    assert group.effective_lr.count == sum(p.numel() for p in model.parameters())
