"""What merging the ranks' reports costs: ``python benchmarks/distributed.py [--quick]``.

Trains a transformer-shaped model under FSDP2 on 2 and then 4 CPU processes (gloo) with
``lrscope.watch(..., every=1)`` and prints, per measured step (median over the steps),
the time of the measurement itself (each rank's statistics of its shards) beside the
time of the merge (lrscope's barrier, the one gather of the ranks' reports, and rank 0's
union of the sketches), as seen on rank 0, and the size of what each rank sends.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                   torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*blocks)


def _rank(rank: int, world: int, port: int, width: int, layers: int, steps: int, out: str) -> None:
    import lrscope
    import lrscope.torch
    from lrscope.torch import monitor as torch_monitor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(width, layers)
    mesh = init_device_mesh("cpu", (world,))
    for block in model:
        if isinstance(block, torch.nn.Linear):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    timings = {"measure": [], "merge": []}
    sizes = []
    with lrscope.watch(optimizer, every=1, findings=False) as monitor:
        reader_report, whole = monitor.reader.report, monitor._whole

        def timed_report(*args, **kwargs):
            start = time.perf_counter()
            report = reader_report(*args, **kwargs)
            timings["measure"].append(time.perf_counter() - start)
            sizes.append(len(pickle.dumps(report)))
            return report

        def timed_whole(report):
            start = time.perf_counter()
            merged = whole(report)
            timings["merge"].append(time.perf_counter() - start)
            return merged

        monitor.reader.report, monitor._whole = timed_report, timed_whole
        x = torch.randn(8, width)
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    assert torch_monitor  # (imported for its hooks)
    if rank == 0:
        with open(out, "wb") as handle:
            pickle.dump({k: v[1:] for k, v in timings.items()} | {"bytes": sizes[-1],
                        "params": sum(p.numel() for p in model.parameters()),
                        "tensors": len(list(model.parameters()))}, handle)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, a few steps")
    args = parser.parse_args()
    width, layers, steps = (128, 2, 4) if args.quick else (512, 6, 8)
    print(f"FSDP2 on CPU processes (gloo), AdamW, every step measured; {os.cpu_count()} CPU cores")
    print(f"{'processes':>9}  {'params':>10}  {'tensors':>7}  {'measure ms':>10}  {'merge ms':>9}  "
          f"{'merge/measure':>13}  {'sent per rank':>13}")
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.pkl")
            torch.multiprocessing.spawn(_rank, args=(world, _free_port(), width, layers, steps, out),
                                        nprocs=world, join=True)
            with open(out, "rb") as handle:
                result = pickle.load(handle)
        measure = statistics.median(result["measure"]) * 1e3
        merge = statistics.median(result["merge"]) * 1e3
        print(f"{world:>9}  {result['params']:>10,}  {result['tensors']:>7}  {measure:>10.1f}  {merge:>9.1f}  "
              f"{merge / measure:>12.2f}x  {result['bytes'] / 1024:>10.0f} KiB")


if __name__ == "__main__":
    main()
