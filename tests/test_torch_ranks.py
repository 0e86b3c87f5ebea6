"""Whole-model reports across ranks: DDP, FSDP2 (uneven shards), HSDP, ZeroRedundancyOptimizer, FSDP1.

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
#: FSDP1 (FullyShardedDataParallel) engines: the options of each.
FSDP1 = {"fsdp1": {"use_orig_params": True}, "fsdp1_flat": {"use_orig_params": False},
         "fsdp1_noshard": {"sharding_strategy": "NO_SHARD"}, "fsdp1_hybrid": {"sharding_strategy": "HYBRID_SHARD"}}
ENGINES = ["ddp", "fsdp2", "hsdp", "zero", *FSDP1]
#: The torch.distributed functions counted (on lrscope's group) by the collectives test.
COLLECTIVES = ("all_reduce", "all_gather_object", "gather_object", "broadcast_object_list", "broadcast",
               "all_gather", "gather", "reduce", "scatter", "barrier", "monitored_barrier")


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

    for engine, options in FSDP1.items():
        fsdp1 = _fsdp1(**options)
        yield engine, fsdp1, _optimizer(fsdp1.parameters())


def _fsdp1(**options):
    """FSDP1 units around the first layer and the whole, on the CPU (``device_id``): each rank's
    shard of a unit's flat parameter cuts across its tensors (the first unit's 8 * 64 + 64
    elements split evenly over 4 ranks, the second's 64 * 6 + 6 not: the last shard padded)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    if options.get("sharding_strategy") == "HYBRID_SHARD":
        from torch.distributed.device_mesh import init_device_mesh

        options = {**options, "device_mesh": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))}
    if "sharding_strategy" in options:
        options = {**options, "sharding_strategy": getattr(ShardingStrategy, options["sharding_strategy"])}
    model = _model()
    model[0] = FullyShardedDataParallel(model[0], device_id=torch.device("cpu"), **options)
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **options)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = []  # (collective, group) of every call, the engines' own included
    for name in COLLECTIVES:  # (the real functions still run)
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("group")))
            return _real(*args, **kwargs)
        setattr(dist, name, counted)
    results = {}
    try:
        for engine, model, optimizer in _engines(rank):
            log_dir = os.path.join(out, engine)
            start = len(calls)
            monitor = lrscope.watch(optimizer, model=model, every=EVERY, log_dir=log_dir)
            group = monitor._ranks.group
            marks = [len(calls)]
            reports = []
            torch.manual_seed(1)
            for _ in range(STEPS):
                x, y = torch.randn(16, 8), torch.randn(16, 6)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                reports.append(monitor.last)
                marks.append(len(calls))
            monitor.close()
            # lrscope's collectives (on its own group) when watching starts, then at each step.
            spans = [(start, marks[0]), *zip(marks, marks[1:])]
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()  # FSDP2: DTensors
                        for g in optimizer.param_groups for p in g["params"])
            results[engine] = {"reports": reports, "local": local, "calls": [
                sorted(name for name, on in calls[a:b] if on is group) for a, b in spans]}
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


@pytest.mark.parametrize("engine", ENGINES)
def test_rank_zero_reports_the_whole_model(ranks, single, engine):
    _, results = ranks
    got = results[0][engine]["reports"][-1]
    want = single[-1]
    assert got.t == want.t == STEPS
    group, whole = got.groups[0], want.groups[0]
    assert set(group.params) == set(whole.params)  # the unsharded model's names
    for name, param in whole.params.items():
        mine = group.params[name]
        assert mine.shape == param.shape  # the whole tensor's
        _same_distribution(mine.effective_lr, param.effective_lr)
        assert mine.update_norm == pytest.approx(param.update_norm, rel=1e-5)
        assert mine.param_norm == pytest.approx(param.param_norm, rel=1e-5)
    _same_distribution(group.effective_lr, whole.effective_lr)
    assert group.step_size == pytest.approx(whole.step_size, rel=1e-12)
    assert not any("this rank's shards" in note for note in got.notes)
    total = sum(p.numel() for p in _model().parameters())
    if engine.startswith(("fsdp", "hsdp")) and engine != "fsdp1_noshard":  # each rank steps its shards only
        assert all(rank[engine]["local"] < total for rank in results)


@pytest.mark.parametrize("engine", ENGINES)
def test_collectives_only_on_measured_steps(ranks, engine):
    _, results = ranks
    for rank in results:
        watching, *steps = rank[engine]["calls"]
        assert watching == ["all_gather_object", "monitored_barrier"]  # every= checked
        # Two all-reduces per measured step (MIN, then SUM), none on the others; the first
        # measured step first gathers the ranks' layouts (which tensors, which buckets).
        assert steps[0] == ["all_gather_object", "all_reduce", "all_reduce", "all_reduce"]
        assert steps[1:] == [["all_reduce", "all_reduce"] if t % EVERY == 1 else []
                             for t in range(2, STEPS + 1)]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
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


def _astray(rank: int, port: int, out: str) -> None:
    """Two ways for the ranks to part: different step counts, then a rank that stops watching."""
    import warnings

    import torch.distributed as dist
    from lrscope.torch import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    distributed.DEFAULT_TIMEOUT = 3.0  # seconds lrscope's collectives wait for a missing rank
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = torch.nn.parallel.DistributedDataParallel(_model())
            optimizer = _optimizer(model.parameters())
            if rank == 1:  # one step more than rank 0 before watching: its t is ahead
                _train(model.module, optimizer, steps=1)
            with lrscope.watch(optimizer, model=model, every=1, findings=False) as monitor:
                _train(model, optimizer, steps=2)
            at_different_steps = [str(w.message) for w in caught]
            per_rank = monitor.last.to_dict()

            caught.clear()
            model = torch.nn.parallel.DistributedDataParallel(_model())
            optimizer = _optimizer(model.parameters())
            monitor = lrscope.watch(optimizer, model=model, every=1, findings=False)
            _train(model, optimizer, steps=1)
            if rank == 1:
                monitor.close()  # stops watching: rank 0 waits for it in vain at its next step
            _train(model, optimizer, steps=1)
            monitor.close()
            stopped = [str(w.message) for w in caught]
        dist.barrier()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump({"at_different_steps": at_different_steps, "per_rank": per_rank,
                       "stopped": stopped}, handle)
    finally:
        dist.destroy_process_group()


def test_ranks_that_part_get_a_clear_warning_and_per_rank_reports(tmp_path):
    torch.multiprocessing.spawn(_astray, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(ranks):  # both ranks see the mismatch and say the same
        merging = [m for m in result["at_different_steps"] if "merging the ranks' reports failed" in m]
        assert len(merging) == 1 and "t from 1 to 2" in merging[0] and "same every=" in merging[0]
        assert not any("merged from" in note for note in result["per_rank"]["notes"])
    for rank, result in enumerate(ranks):  # each its replica, marked as such on rank 1 (lrscope merge)
        group = result["per_rank"]["groups"][0]
        assert group["effective_lr"]["count"] == sum(p.numel() for p in _model().parameters())
        assert [p.get("replica", False) for p in group["params"].values()] == [rank == 1] * 4
    stopped = [m for m in ranks[0]["stopped"] if "merging the ranks' reports failed" in m]
    assert len(stopped) == 1 and "step 2, not every rank joined" in stopped[0] and "within 3 s" in stopped[0]
    assert not any("merging" in m for m in ranks[1]["stopped"])
