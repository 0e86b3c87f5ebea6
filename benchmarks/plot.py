"""How long does ``lrscope plot`` take on a long run, and how much memory?

    python benchmarks/plot.py                 # 1,000,000 steps, distributions every 50
    python benchmarks/plot.py --steps 140000 --every 10
    python benchmarks/plot.py --log runs/x/lrscope.jsonl   # an existing log

Writes a JSONL log as the JSONL sink writes it for a small MLP (one group, four tensors
of 1,280, 64, 64 and 1 elements, every tensor's sketch: about 11 KB on a step with
distributions, 0.4 KB on the others), then runs ``lrscope plot`` on it in a fresh process
and prints its wall time, CPU time and peak resident memory (the kernel's ``ru_maxrss``
of the largest of its processes: a log over 64 MiB is read by one process per CPU, up to
8), and how many points the figure drew per series.  The goal: a million steps in
under 10 s, memory set by the figure's resolution, not the length of the log.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
from lrscope.sinks.jsonl import encode

TENSORS = {"0.weight": 1280, "0.bias": 64, "2.weight": 64, "2.bias": 1}
VARIANTS = 16  # distinct sets of distributions, reused in turn (parsing costs the same)


def _reports(rng: np.random.Generator) -> list[GroupReport]:
    """Groups of measured steps: log-normal eta per tensor, a few eps-dominated elements."""
    groups = []
    for _ in range(VARIANTS):
        params = {}
        for name, size in TENSORS.items():
            eta = 10 ** rng.normal(-1, 1, size)
            params[name] = ParamReport(
                name=name, shape=(size,), effective_lr=Distribution.from_array(eta, int(size * 0.02)),
                update_norm=float(rng.uniform(1e-4, 1e-3)) * size**0.5, param_norm=size**0.5)
        groups.append(GroupReport.combine(params, name="pg0", lr=1e-3, step_size=1e-3))
    return groups


def write_log(path: str, steps: int, every: int) -> None:
    rng = np.random.default_rng(0)
    measured = _reports(rng)
    light = json.loads(encode(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
                                         groups=[GroupReport(name="pg0", lr=1e-3, step_size=1e-3,
                                                             weight_decay_rate=0.0)]), 0.0))
    heavy = [json.loads(encode(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
                                          groups=[group]), 0.0)) for group in measured]
    lr0, start = 1e-3, time.time()
    with open(path, "w") as handle:
        for t in range(1, steps + 1):
            lr = lr0 * 0.5 * (1 + np.cos(np.pi * t / steps))  # cosine schedule
            step_size = lr * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
            record = heavy[t % VARIANTS] if (t - 1) % every == 0 else light
            record["t"], record["wall_time"] = t, start + 0.1 * t
            group = record["groups"][0]
            group["lr"], group["step_size"] = float(lr), float(step_size)
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")


#: ``lrscope plot`` as the command runs it, with the reading timed and the points counted.
_CHILD = """
import sys, time
from lrscope import plot
from lrscope.cli import main
load, read = plot.load, []
def timed_load(path):
    start = time.perf_counter()
    run = load(path)
    read.append((time.perf_counter() - start, run))
    return run
plot.load = timed_load
code = main(["plot", *sys.argv[1:]])
seconds, run = read[0]
sizes = [s.steps.size for metrics in run.groups.values() for s in metrics.values()]
print(f"read in {seconds:.1f} s; points per series: at most {max(sizes):,}")
sys.exit(code)
"""


def plot(log: str, png: str) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (its reading processes included), peak RSS in MiB (of the
    largest process) and the output of ``lrscope plot`` in a fresh process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, log, "--png", png], capture_output=True,
                            text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, (result.stdout + result.stderr).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=50, help="distributions every N steps")
    parser.add_argument("--keep", help="write the log to this directory and keep it")
    parser.add_argument("--log", help="time this existing log instead of writing one")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp()
    os.makedirs(folder, exist_ok=True)
    log = args.log or os.path.join(folder, "lrscope.jsonl")
    if args.log is None:
        start = time.perf_counter()
        write_log(log, args.steps, args.every)
        print(f"log: {args.steps:,} steps, distributions every {args.every}: "
              f"{os.path.getsize(log) / 2**20:,.0f} MiB, written in {time.perf_counter() - start:.0f} s")
    else:
        print(f"log: {log}, {os.path.getsize(log) / 2**20:,.0f} MiB")
    elapsed, cpu, peak, output = plot(log, os.path.join(folder, "lrscope.png"))
    print(output)
    print(f"lrscope plot: {elapsed:.1f} s in all (a fresh process, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f}), {cpu:.1f} CPU-s, peak RSS {peak:,.0f} MiB")
    if not args.keep and not args.log:
        os.remove(log)


if __name__ == "__main__":
    main()
