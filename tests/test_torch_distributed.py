"""Per-rank reports (``distributed=False``) of FSDP2 (``fully_shard``, DTensor) on two CPU processes.

Each rank watches its own optimizer and reports its shards, with no communication; the
ranks' sketches and norms together equal those of the same training unsharded.  (The
default, whole-model reports on rank 0, is tested in test_torch_ranks.py.)  In the same
processes: Muon and Adafactor, whose formulas need whole tensors, on FSDP2 shards.
"""

from __future__ import annotations

import json
import math
import os
import socket

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.report import Distribution  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def _train(model, optimizer, steps: int = 3) -> None:
    torch.manual_seed(1)  # the same batches on every rank: the averaged gradient is the plain one
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randn(16, 4)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _rank(rank: int, port: int, out: str) -> None:
    """One FSDP2 rank: watch, train, write the last report and this rank's shard sizes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        with lrscope.watch(optimizer, model=model, distributed=False) as monitor:
            _train(model, optimizer)
        shards = {name: p.to_local().numel() for name, p in model.named_parameters()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump({"report": monitor.last.to_dict(), "shards": shards, **_whole_tensor_families(mesh)},
                      handle)
    finally:
        torch.distributed.destroy_process_group()


def _whole_tensor_families(mesh) -> dict:
    """Muon and Adafactor, whose formulas need whole tensors, on FSDP2 shards: Muon's report
    (whole-model, rank 0's) and what torch's Adafactor does."""
    from torch.distributed.fsdp import fully_shard

    def sharded():
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = sharded()
    muon = torch.optim.Muon([model[0].weight, model[2].weight], lr=1e-2, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw")
    with lrscope.watch(muon, model=model, findings=False) as monitor:
        _train(model, muon)
    model = sharded()
    adafactor = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    try:
        _train(model, adafactor, steps=1)
        refused = None
    except RuntimeError as error:
        refused = str(error)
    return {"muon": monitor.last.to_dict(), "adafactor_refused": refused}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    torch.multiprocessing.spawn(_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_fsdp2_ranks_report_their_shards_and_together_the_whole(ranks):

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with lrscope.watch(optimizer, model=model) as monitor:
        _train(model, optimizer)
    whole = monitor.last

    for rank in ranks:
        report = rank["report"]
        assert report["t"] == whole.t == 3
        assert any("this rank's shards" in note for note in report["notes"])
    for name, param in whole.groups[0].params.items():
        records = [rank["report"]["groups"][0]["params"][name] for rank in ranks]
        for record, rank in zip(records, ranks):  # each rank: its own shard only
            assert record["effective_lr"]["count"] == rank["shards"][name]
        merged = Distribution.union([Distribution.from_dict(r["effective_lr"]) for r in records])
        want = param.effective_lr
        assert merged.count == want.count == sum(rank["shards"][name] for rank in ranks)
        assert merged.eps_dominated_count == want.eps_dominated_count
        assert merged.min == pytest.approx(want.min, rel=1e-6)
        assert merged.max == pytest.approx(want.max, rel=1e-6)
        assert merged.mean == pytest.approx(want.mean, rel=1e-6)
        for q in (0.05, 0.5, 0.95):
            assert merged.quantile(q) == pytest.approx(want.quantile(q), rel=0.02)
        for norm in ("update_norm", "param_norm"):
            together = math.sqrt(sum(r[norm] ** 2 for r in records))
            assert together == pytest.approx(getattr(param, norm), rel=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_and_adafactor_on_fsdp2_shards(ranks):
    """Muon's eta needs the whole matrix's shape and its update the whole matrix's Newton-Schulz:
    on shards the distributions are skipped with the reason, the scalars and the model's names
    and global shapes reported.  torch's own Adafactor does not step DTensors (torch 2.13):
    docs/distributed.md says so; when this changes, model its factored statistics here."""
    rank0 = ranks[0]
    muon = rank0["muon"]
    assert muon["t"] == 3 and "group pg0: muon needs whole tensors, and its parameters are sharded " \
        "(DTensor): distributions skipped" in muon["notes"]
    group = muon["groups"][0]
    assert group["lr"] == 1e-2 and group["weight_decay_rate"] == pytest.approx(1e-2 * 0.1)
    assert {name: p["shape"] for name, p in group["params"].items()} == {"0.weight": [64, 8], "2.weight": [4, 64]}
    assert all(p["effective_lr"] is None for p in group["params"].values())
    refused = rank0["adafactor_refused"]
    assert refused is not None and "in-place operations that require placement changes" in refused
