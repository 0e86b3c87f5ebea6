"""How much does watching cost?  Ratios measured in one run on this machine.

    python benchmarks/overhead.py            # ~2 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick    # smaller model, for a smoke run

Prints, for PyTorch (CPU):

1. full distributions (every SPEC statistic) for Adam over ~50M parameters in
   transformer-like shapes, as a ratio to the optimizer step itself, to one read pass
   over exp_avg_sq, and to a naive monitor (per-tensor log10 + histc + .item());
2. scalars only, every step, as a fraction of a small model's whole training step;
3. extra peak memory while computing distributions (measured in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

import lrscope
import lrscope.torch
from lrscope.backends import torch_stats


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def transformer_shapes(scale: float) -> list[tuple[int, ...]]:
    """Embedding, 8 blocks (attention, MLP, norms), output head: ~50M parameters at scale 1."""
    d, vocab = int(512 * scale) or 8, int(32000 * scale) or 8
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(8):
        shapes += [(d, d)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    shapes += [(vocab // 2, d)]
    return shapes


def adam_with_state(shapes: list[tuple[int, ...]]) -> tuple[torch.optim.Adam, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return optimizer, params


def naive_monitor(optimizer: torch.optim.Adam) -> None:
    """What people write first: eta per tensor, log10, histc, and .item() per statistic."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    for p in group["params"]:
        state = optimizer.state[p]
        t = state["step"].item()
        eta = group["lr"] / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
        logs = eta.log10()
        torch.histc(logs, bins=100, min=-6, max=2)
        _ = (eta.min().item(), eta.max().item(), eta.mean().item(), (eta > group["lr"] / eps / 2).sum().item())


def distributions(scale: float, repeat: int) -> dict[str, float]:
    optimizer, params = adam_with_state(transformer_shapes(scale))
    n = sum(p.numel() for p in params)
    step = best_of(optimizer.step, repeat)
    read_once = best_of(lambda: [optimizer.state[p]["exp_avg_sq"].sum() for p in params], repeat)
    naive = best_of(lambda: naive_monitor(optimizer), max(1, repeat // 2))
    monitor = best_of(lambda: lrscope.inspect(optimizer), repeat)
    return {"parameters": n, "adam_step_s": step, "read_once_s": read_once, "naive_s": naive,
            "lrscope_s": monitor}


def scalars_only(repeat: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))

    def train_steps() -> None:
        for _ in range(50):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    plain = best_of(train_steps, repeat)
    # every: distributions only on the first step, so these steps report scalars only.
    with lrscope.watch(optimizer, model=model, every=10**9):
        train_steps()  # passes step 1 (with distributions) before timing
        watched = best_of(train_steps, repeat)
    return {"train_step_s": plain / 50, "watched_step_s": watched / 50}


_MEMORY_CHILD = """
import json, resource, sys, torch, lrscope, lrscope.torch
sys.path.insert(0, "benchmarks")
from overhead import adam_with_state, transformer_shapes
optimizer, params = adam_with_state(transformer_shapes(float(sys.argv[1])))
optimizer.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lrscope.inspect(optimizer)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_peak_kib": after - before}))
"""


def memory(scale: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(scale)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    args = parser.parse_args()
    scale, repeat = (0.1, 3) if args.quick else (1.0, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"chunk = {torch_stats.CHUNK_ELEMENTS:,} elements")

    d = distributions(scale, repeat)
    print(f"\n1. Full distributions, Adam, {d['parameters'] / 1e6:.1f}M parameters")
    print(f"   Adam step                  {d['adam_step_s'] * 1e3:8.1f} ms")
    print(f"   one read of exp_avg_sq     {d['read_once_s'] * 1e3:8.1f} ms")
    print(f"   naive log10+histc monitor  {d['naive_s'] * 1e3:8.1f} ms")
    print(f"   lrscope distributions      {d['lrscope_s'] * 1e3:8.1f} ms")
    print(f"   ratio to the Adam step     {d['lrscope_s'] / d['adam_step_s']:8.2f} x   (goal <= 0.3)")
    print(f"   ratio to one read pass     {d['lrscope_s'] / d['read_once_s']:8.2f} x")
    print(f"   ratio to the naive monitor {d['lrscope_s'] / d['naive_s']:8.2f} x")

    s = scalars_only(repeat)
    overhead = s["watched_step_s"] / s["train_step_s"] - 1
    print("\n2. Scalars only, every step, small MLP (batch 128)")
    print(f"   training step              {s['train_step_s'] * 1e6:8.0f} us")
    print(f"   watched training step      {s['watched_step_s'] * 1e6:8.0f} us")
    print(f"   overhead                   {overhead * 100:8.2f} %   (goal <= 1 %)")

    m = memory(scale)
    print("\n3. Extra peak memory while computing distributions")
    print(f"   {m['extra_peak_kib'] / 1024:.1f} MiB (chunk of {torch_stats.CHUNK_ELEMENTS:,} elements; "
          f"bounded by a few chunk-sized buffers, not by the model)")


if __name__ == "__main__":
    main()
