"""Whole-model reports across ranks: DDP, FSDP2 (uneven shards), HSDP, ZeroRedundancyOptimizer.

Four CPU processes (gloo) train the same model with the same batches on every rank, so the
averaged gradient is the one-process gradient: rank 0's report must equal the report of
the same training in one process (bucket counts identical, min/max/mean/norms to float
tolerance), the other ranks must write nothing, and only measured steps communicate.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 4
STEPS = 5
EVERY = 2  # measured steps 1, 3, 5


def _model():
    torch.manual_seed(0)
    # 6 output rows over 4 ranks: FSDP2 shards of 2, 2, 2 and 0 rows (uneven, one empty).
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 6))


def _train(model, optimizer, steps: int = STEPS) -> None:
    torch.manual_seed(1)  # the same batches on every rank: the averaged gradient is the plain one
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randn(16, 6)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _engines(rank: int):
    """(engine name, model, optimizer) for every engine, built on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(_model())
    yield "ddp", ddp, _optimizer(ddp.parameters())

    fsdp = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (fsdp[0], fsdp[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    yield "fsdp2", fsdp, _optimizer(fsdp.parameters())

    hsdp = _model()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in (hsdp[0], hsdp[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(hsdp, mesh=mesh)
    yield "hsdp", hsdp, _optimizer(hsdp.parameters())

    zero_model = DistributedDataParallel(_model())
    yield "zero", zero_model, ZeroRedundancyOptimizer(zero_model.parameters(), torch.optim.AdamW,
                                                      lr=1e-2, weight_decay=0.1)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = {"gather_object": 0, "monitored_barrier": 0}
    for name in calls:  # count lrscope's collectives (the real functions still run)
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        setattr(dist, name, counted)
    results = {}
    try:
        for engine, model, optimizer in _engines(rank):
            log_dir = os.path.join(out, engine)
            before = dict(calls)
            monitor = lrscope.watch(optimizer, model=model, every=EVERY, log_dir=log_dir)
            reports = []
            torch.manual_seed(1)
            for _ in range(STEPS):
                x, y = torch.randn(16, 8), torch.randn(16, 6)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                reports.append(monitor.last)
            monitor.close()
            results[engine] = {"reports": reports,
                               "calls": {k: calls[k] - before[k] for k in calls}}
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump(results, handle)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The same training in one process: the reports of every step."""
    model = _model()
    optimizer = _optimizer(model.parameters())
    reports = []
    with lrscope.watch(optimizer, model=model, every=EVERY) as monitor:
        torch.manual_seed(1)
        for _ in range(STEPS):
            x, y = torch.randn(16, 8), torch.randn(16, 6)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            reports.append(monitor.last)
    return reports


def _same_distribution(got, want):
    assert got.count == want.count
    assert got.eps_dominated_count == want.eps_dominated_count
    for side in ("positive", "negative"):
        for a, b in zip(getattr(got.sketch, side), getattr(want.sketch, side)):
            np.testing.assert_array_equal(a, b)  # bucket counts identical
    assert got.min == pytest.approx(want.min, rel=1e-6)
    assert got.max == pytest.approx(want.max, rel=1e-6)
    assert got.mean == pytest.approx(want.mean, rel=1e-5)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "hsdp", "zero"])
def test_rank_zero_reports_the_whole_model(ranks, single, engine):
    _, results = ranks
    got = results[0][engine]["reports"][-1]
    want = single[-1]
    assert got.t == want.t == STEPS
    group, whole = got.groups[0], want.groups[0]
    assert set(group.params) == set(whole.params)  # the unsharded model's names
    for name, param in whole.params.items():
        mine = group.params[name]
        _same_distribution(mine.effective_lr, param.effective_lr)
        assert mine.update_norm == pytest.approx(param.update_norm, rel=1e-5)
        assert mine.param_norm == pytest.approx(param.param_norm, rel=1e-5)
    _same_distribution(group.effective_lr, whole.effective_lr)
    assert group.step_size == pytest.approx(whole.step_size, rel=1e-12)
    assert not any("this rank's shards" in note for note in got.notes)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "hsdp", "zero"])
def test_collectives_only_on_measured_steps(ranks, engine):
    _, results = ranks
    measured = len(range(1, STEPS + 1, EVERY))
    for rank in results:
        # One barrier and one gather per measured step, one barrier when watching starts.
        assert rank[engine]["calls"] == {"gather_object": measured, "monitored_barrier": measured + 1}


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_only_rank_zero_writes_logs(ranks, engine):
    out, results = ranks
    lines = (out / engine / "lrscope.jsonl").read_text().splitlines()
    assert [json.loads(line)["t"] for line in lines] == list(range(1, STEPS + 1))
    counts = [json.loads(line)["groups"][0].get("effective_lr") for line in lines]
    assert [c is not None for c in counts] == [t % EVERY == 1 for t in range(1, STEPS + 1)]
    events = [p for p in (out / engine).iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1  # rank 0's TensorBoard file only


def _per_rank(rank: int, port: int, out: str) -> None:
    """distributed=False: every rank writes its own log (per-rank reports, today's behaviour)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        mesh = init_device_mesh("cpu", (2,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = _optimizer(model.parameters())
        with lrscope.watch(optimizer, model=model, every=EVERY, distributed=False,
                           log_dir=os.path.join(out, f"rank{rank}")):
            _train(model, optimizer)
    finally:
        dist.destroy_process_group()


def test_per_rank_logs_merge_offline_into_the_whole(tmp_path, single):
    torch.multiprocessing.spawn(_per_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    from lrscope.cli import main

    assert main(["merge", str(tmp_path / "rank0"), str(tmp_path / "rank1"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["merge", str(tmp_path / "rank0"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 2
    from lrscope.logs import read_jsonl
    from lrscope.report import Distribution

    last = list(read_jsonl(tmp_path / "merged" / "lrscope.jsonl"))[-1]
    want = single[-1].groups[0]
    for name, param in want.params.items():
        got = Distribution.from_dict(last["groups"][0]["params"][name]["effective_lr"])
        _same_distribution(got, param.effective_lr)
        assert math.isclose(last["groups"][0]["params"][name]["update_norm"], param.update_norm, rel_tol=1e-5)


def _mismatched(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        optimizer = _optimizer(model.parameters())
        try:
            lrscope.watch(optimizer, model=model, every=10 + rank)
        except ValueError as error:
            with open(os.path.join(out, f"rank{rank}.txt"), "w") as handle:
                handle.write(str(error))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_on_every_get_a_clear_error(tmp_path):
    torch.multiprocessing.spawn(_mismatched, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "different every=" in message and "rank 0: 10" in message and "rank 1: 11" in message
