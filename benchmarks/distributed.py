"""What merging the ranks' reports costs: ``python benchmarks/distributed.py [--quick]``.

Trains a transformer-shaped model under FSDP2 on 2 and then 4 CPU processes (gloo) with
``lrscope.watch(..., every=1)`` and prints, per measured step (medians), as seen on rank 0:

* the measurement itself (each rank's statistics of its shards);
* the merge during training (lrscope's two all-reduces and rank 0's decoding), which
  includes waiting for the slowest rank's measurement;
* the merge alone: the same merge of the last step's parts repeated after a barrier;
* what each rank sends (both vectors), and what one all-reduce over the full fixed range
  of float32 buckets (every distribution, every bucket) would send, with its time.
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

REPEATS = 7


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                   torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*blocks)


def _median_ms(run, group) -> float:
    """Median time of ``run()`` started together on every rank."""
    times = []
    for _ in range(REPEATS):
        dist.barrier(group=group)
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rank(rank: int, world: int, port: int, width: int, layers: int, steps: int, out: str) -> None:
    import lrscope
    import lrscope.torch
    from lrscope.stats import mapping
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
    parts, sent, sizes = [], [], []
    with lrscope.watch(optimizer, every=1, findings=False) as monitor:
        ranks = monitor._ranks
        reader_report, whole, all_reduce = monitor.reader.report, monitor._whole, ranks._all_reduce

        def timed_report(*args, **kwargs):
            start = time.perf_counter()
            report = reader_report(*args, **kwargs)
            timings["measure"].append(time.perf_counter() - start)
            return report

        def timed_whole(report):
            parts.append(report)
            sent.clear()
            start = time.perf_counter()
            merged = whole(report)
            timings["merge"].append(time.perf_counter() - start)
            sizes.append(sum(sent))
            return merged

        def sized_all_reduce(values, *args):
            sent.append(values.nbytes)
            return all_reduce(values, *args)

        monitor.reader.report, monitor._whole, ranks._all_reduce = timed_report, timed_whole, sized_all_reduce
        x = torch.randn(8, width)
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        merge_alone = _median_ms(lambda: ranks.merge(parts[-1]), ranks.group)
        distributions = len(ranks.layout.dists)
        full = torch.zeros(distributions * mapping.FLOAT32_BUCKETS, dtype=torch.float64)
        full_ms = _median_ms(lambda: dist.all_reduce(full, group=ranks.group), ranks.group)
    if rank == 0:
        with open(out, "wb") as handle:
            pickle.dump({k: v[1:] for k, v in timings.items()} | {  # the first step also gathers the layout
                "merge_alone": merge_alone, "bytes": sizes[-1], "full_bytes": full.numel() * 8,
                "full_ms": full_ms, "params": sum(p.numel() for p in model.parameters()),
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
    print(f"FSDP2 on CPU processes (gloo), AdamW, every step measured; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'processes':>9}  {'params':>10}  {'tensors':>7}  {'measure ms':>10}  {'merge ms':>8}  "
          f"{'merge alone ms':>14}  {'alone/measure':>13}  {'sent per rank':>13}  "
          f"{'full range':>10}  {'full range ms':>13}")
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.pkl")
            torch.multiprocessing.spawn(_rank, args=(world, _free_port(), width, layers, steps, out),
                                        nprocs=world, join=True)
            with open(out, "rb") as handle:
                result = pickle.load(handle)
        measure = statistics.median(result["measure"]) * 1e3
        merge = statistics.median(result["merge"]) * 1e3
        alone = result["merge_alone"]
        print(f"{world:>9}  {result['params']:>10,}  {result['tensors']:>7}  {measure:>10.1f}  {merge:>8.1f}  "
              f"{alone:>14.1f}  {alone / measure:>12.2f}x  {result['bytes'] / 1024:>9.0f} KiB  "
              f"{result['full_bytes'] / 2**20:>6.1f} MiB  {result['full_ms']:>13.1f}")


if __name__ == "__main__":
    main()
