"""How much does watching cost?  Ratios measured in one run on this machine.

    python benchmarks/overhead.py            # ~5 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick    # smaller model, for a smoke run
    python benchmarks/overhead.py --torch    # sections 1-3 only (PyTorch; ~2 minutes)
    python benchmarks/overhead.py --optax    # section 4 only (Optax; ~2 minutes)
    python benchmarks/overhead.py --keras    # section 5 only (Keras' three backends; ~1 minute)
    python benchmarks/overhead.py --kernel   # section 6 only (what bounds a CPU measurement; ~20 s)
    python benchmarks/overhead.py --device cuda   # sections 1-4 on a GPU (~2 minutes)

Prints, for PyTorch (CPU, or the GPU that ``--device`` names):

1. full distributions (every SPEC statistic) for Adam over ~50M parameters in
   transformer-like shapes, as a ratio to the optimizer step itself, to one read pass
   over exp_avg_sq, and to a naive monitor (per-tensor log10 + histc + .item());
2. scalars only, every step, as a fraction of a small model's whole training step;
3. extra peak memory while computing distributions (measured in a fresh process,
   from the kernel's peak-RSS counter reset just before; on a GPU, the caching
   allocator's peak counter);
4. and 5. the same ratios for Optax (jitted, on jax's default device) and Keras 3 (its
   three backends); on a GPU, first the device-to-host synchronisations per step;
6. on the CPU, what bounds a measurement: per-element times on one thread of the compiled
   loop, of variants of it without parts of its work, of reading its arrays, and of Optax's
   compiled pass.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

import lrscope
import lrscope.torch
from lrscope.torch import fused as torch_fused, small as torch_small, stats as torch_stats
from lrscope.torch import triton_kernel
from lrscope.sinks import JsonlSink
from lrscope.stats import mapping
from lrscope.stats.compiled import BLOCK as KERNEL_BLOCK


def wait() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA): timings include it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call, the GPU work it queued included."""
    wait()
    start = time.perf_counter()
    fn()
    wait()
    return time.perf_counter() - start


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeat))


def process_time_of(fn: Callable[[], object]) -> float:
    """CPU time of this process (all its threads) for one call."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved_rounds(work: dict[str, Callable[[], object]], repeat: int,
                       clock: Callable[[Callable[[], object]], float] = timed) -> dict[str, list[float]]:
    """One time per call and round (wall time, or what ``clock`` measures), the calls
    interleaved in every round (so that a slow spell of this shared machine hits them alike)
    in an order shuffled from round to round (so that no call always follows the same one,
    whose memory traffic or freed pages it would pay for), after one warm-up call each."""
    for fn in work.values():
        fn()
    rounds: dict[str, list[float]] = {name: [] for name in work}
    order, shuffle = list(work), random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            rounds[name].append(clock(work[name]))
    return rounds


def transformer_shapes(scale: float) -> list[tuple[int, ...]]:
    """Embedding, 8 blocks (attention, MLP, norms), output head: ~50M parameters at scale 1."""
    d, vocab = int(512 * scale) or 8, int(32000 * scale) or 8
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(8):
        shapes += [(d, d)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    shapes += [(vocab // 2, d)]
    return shapes


def adam_with_state(shapes: list[tuple[int, ...]], device: str = "cpu", cls: type = torch.optim.Adam,
                    **options: Any) -> tuple[torch.optim.Adam, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    optimizer = cls(params, lr=1e-3, **(options or {"foreach": True}))
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


@torch.no_grad()
def olmo_style(optimizer: torch.optim.Adam) -> None:
    """What OLMo logs per parameter: min, max, mean and norm of the gradient, the parameter
    and both Adam moments, each read with ``.item()``."""
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        for x in (p.grad, p, state["exp_avg"], state["exp_avg_sq"]):
            _ = (x.min().item(), x.max().item(), x.mean().item(), x.norm().item())


@torch.no_grad()
def composer_style(optimizer: torch.optim.Adam) -> None:
    """What Composer's optimizer monitor logs per parameter for Adam: the step it rebuilds
    from the moments, and the norms of it, the gradient, the parameter and both moments,
    with the cosine between the step and the gradient, each read with ``.item()``."""
    group = optimizer.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    for p in group["params"]:
        state = optimizer.state[p]
        t = state["step"].item()
        step = group["lr"] * (state["exp_avg"] / (1 - beta1**t)) / (
            (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
        norms = [x.norm().item() for x in (step, p.grad, p, state["exp_avg"], state["exp_avg_sq"])]
        _ = (norms, torch.nn.functional.cosine_similarity(step.reshape(-1), p.grad.reshape(-1), dim=0).item())


@torch.no_grad()
def wandb_watch_style(optimizer: torch.optim.Adam) -> None:
    """What ``wandb.watch(log="all")`` logs per parameter: a 64-bin histogram of the parameter
    and of its gradient between their min and max, read back to the host."""
    for p in optimizer.param_groups[0]["params"]:
        for x in (p, p.grad):
            low, high = x.min().item(), x.max().item()
            _ = torch.histc(x.float(), bins=64, min=low, max=high).tolist()


#: The peers' monitors of section 1, each computing less than lrscope (no eta, no sketch).
PEERS = {"olmo_style": ("OLMo-style min/max/mean/norm", olmo_style),
         "composer_style": ("Composer-style step norms", composer_style),
         "wandb_style": ("wandb.watch-style histograms", wandb_watch_style)}


def distributions(scale: float, repeat: int, device: str) -> dict[str, Any]:
    """Per-round times of the Adam step, one read of exp_avg_sq, lrscope's distributions
    (compiled: numba on the CPU, Triton on a GPU; then eager) and the peers' monitors
    (``PEERS``), interleaved so that a slow spell of the machine hits them alike; on a GPU
    also the foreach AdamW step."""
    optimizer, params = adam_with_state(transformer_shapes(scale), device)
    start = time.perf_counter()
    lrscope.inspect(optimizer)  # compiles the fused kernel
    first = time.perf_counter() - start

    def eager() -> None:
        os.environ["LRSCOPE_FUSED"] = "0"
        try:
            lrscope.inspect(optimizer)
        finally:
            del os.environ["LRSCOPE_FUSED"]

    fused_adam, _ = adam_with_state(transformer_shapes(scale), device, fused=True)
    work = {"adam_step": optimizer.step, "fused_adam_step": fused_adam.step,
            "read_once": lambda: [optimizer.state[p]["exp_avg_sq"].sum() for p in params],
            "lrscope": lambda: lrscope.inspect(optimizer), "eager": eager,
            **{name: functools.partial(monitor, optimizer) for name, (_, monitor) in PEERS.items()}}
    if device != "cpu":  # the step the GPU goal (issue #25) is stated against
        adamw, _ = adam_with_state(transformer_shapes(scale), device, torch.optim.AdamW, foreach=True)
        work["foreach_adamw_step"] = adamw.step
    rounds = interleaved_rounds(work, repeat)
    cpu = cpu_times({name: work[name] for name in ("fused_adam_step", "lrscope")}, repeat) if device == "cpu" else {}
    return {"parameters": sum(p.numel() for p in params), "first_s": first, "rounds": rounds, "cpu": cpu,
            "naive_s": best_of(lambda: naive_monitor(optimizer), max(1, repeat // 2))}


def cpu_times(work: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median CPU time of this process (all its threads) per call, the calls interleaved:
    what a call costs the machine, which other work on a shared machine does not inflate."""
    rounds = interleaved_rounds(work, repeat, clock=process_time_of)
    return {name: statistics.median(times) for name, times in rounds.items()}


def scalars_only(repeat: int, device: str) -> dict[str, float]:
    """A small MLP's training step, and what watching adds to each step (scalars only).

    The monitor's work happens inside ``optimizer.step()`` (its hooks), so its cost is
    measured there, over many steps in interleaved rounds (a whole training step is too
    noisy on a shared machine to resolve 1 %), each loop starting from the same weights and
    state, watched and unwatched in alternating order; the hooks run on the calling thread and
    wait for nothing, so the calling thread's CPU time measures them even while other work
    on a shared machine takes the cores (the wall-clock difference is reported beside it).
    The JSONL sink, whose thread competes for the cores, is measured on whole training steps.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 64, device=device), torch.randint(0, 10, (128,), device=device)

    def train_steps() -> None:
        for _ in range(200):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    train_steps()  # warm-up; the optimizer now has state, so t > 1 below
    # Every loop starts from the same weights and state: thousands of steps on one batch
    # would otherwise drive the model into denormals, slowing later loops threefold.
    start = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    def optimizer_steps(watched: bool) -> tuple[float, float]:
        """Wall and calling-thread CPU time per step of 2000 steps from ``start`` (after 50
        untimed ones), scalars only when ``watched`` (every=10**9 and t > 1)."""
        model.load_state_dict(start[0])
        optimizer.load_state_dict(start[1])
        with lrscope.watch(optimizer, model=model, every=10**9) if watched else contextlib.nullcontext():
            for _ in range(50):
                optimizer.step()
            wait()
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(2000):
                optimizer.step()
            wait()
            return (time.perf_counter() - wall) / 2000, (time.thread_time() - cpu) / 2000

    rounds: dict[str, list[Any]] = {"plain": [], "jsonl": [], "step": [], "watched_step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(repeat * 2):
            model.load_state_dict(start[0])
            optimizer.load_state_dict(start[1])
            rounds["plain"].append(best_of(train_steps, 1) / 200)
            for watched in (index % 2 == 1, index % 2 == 0):
                rounds["watched_step" if watched else "step"].append(optimizer_steps(watched))
            model.load_state_dict(start[0])
            optimizer.load_state_dict(start[1])
            with lrscope.watch(optimizer, model=model, every=10**9,
                               sinks=[JsonlSink(os.path.join(tmp, "lrscope.jsonl"))]):
                rounds["jsonl"].append(best_of(train_steps, 1) / 200)
    median = {k: statistics.median(v) for k, v in rounds.items() if k in ("plain", "jsonl")}
    # What watching adds: the median of the per-round differences, so that a slow spell of
    # the machine, which hits both loops of a round, cancels out.
    added_wall, added = (statistics.median(w[i] - s[i] for s, w in zip(rounds["step"], rounds["watched_step"]))
                         for i in (0, 1))
    return {"train_step_s": median["plain"], "added_s": added, "added_wall_s": added_wall,
            "jsonl_step_s": median["jsonl"], "hooks_s": hooks_alone(repeat, device)}


def hooks_alone(repeat: int, device: str) -> float:
    """What watching adds to the step of an AdamW holding one 1-element tensor (calling
    thread's CPU time, median of the per-round differences): the scalars' hooks cost the
    same whatever the model (they read the groups, never a tensor), and a 20 us step
    resolves them to a fraction of a microsecond where the MLP's step is noisy by tens."""
    param = torch.nn.Parameter(torch.zeros(1, device=device))
    param.grad = torch.ones_like(param)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    optimizer.step()

    def steps(watched: bool) -> float:
        with lrscope.watch(optimizer, every=10**9) if watched else contextlib.nullcontext():
            optimizer.step()
            wait()
            cpu = time.thread_time()
            for _ in range(20000):
                optimizer.step()
            wait()
            return (time.thread_time() - cpu) / 20000

    rounds = [(steps(False), steps(True)) for _ in range(repeat)]
    return statistics.median(watched - plain for plain, watched in rounds)


_MEMORY_CHILD = """
import json, sys, lrscope, lrscope.torch
sys.path.insert(0, "benchmarks")
from overhead import adam_with_state, transformer_shapes

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

optimizer, params = adam_with_state(transformer_shapes(float(sys.argv[1])))
lrscope.inspect(optimizer)  # warm-up: lazy imports and first allocations
extra = []
for _ in range(5):
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS:")
    lrscope.inspect(optimizer)
    extra.append(status("VmHWM:") - before)
print(json.dumps({"extra_peak_kib": sorted(extra)}))
"""


def memory(scale: float, device: str) -> dict[str, float]:
    """Extra peak memory of 5 measurements, in KiB, sorted: RSS in a fresh process on the
    CPU, the caching allocator's peak counter on a GPU."""
    if device == "cpu":
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(scale)], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    optimizer, _ = adam_with_state(transformer_shapes(scale), device)
    lrscope.inspect(optimizer)
    extra = []
    for _ in range(5):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        lrscope.inspect(optimizer)
        extra.append((torch.cuda.max_memory_allocated() - before) // 1024)
    return {"extra_peak_kib": sorted(extra)}


def synchronisations(steps: int, every: int) -> dict[bool, list[int]]:
    """Device-to-host synchronisations per training step of a watched GPU model writing
    to a JSONL sink, on steps with distributions (True) and without (False), counted by
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    x, y = torch.randn(128, 64, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    counts: dict[bool, list[int]] = {True: [], False: []}
    for options in ({"foreach": True}, {"fused": True}, {"capturable": True}):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **options)
        with tempfile.TemporaryDirectory() as tmp, lrscope.watch(
                optimizer, model=model, every=every, sinks=[JsonlSink(os.path.join(tmp, "l.jsonl"))]):
            for t in range(1, steps + 1):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        optimizer.step()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                counts[(t - 1) % every == 0].append(
                    sum("called a synchronizing CUDA operation" in str(w.message) for w in caught))
    return counts


#: Elements of the single tensor whose compiled loop ``kernel_bounds`` times alone.
KERNEL_ELEMENTS = 10_000_000
#: Elements that ``kernel_bounds`` reads from the cache, in three float32 arrays.
CACHED_ELEMENTS = 65_536


def kernel_bounds(scale: float, repeat: int) -> dict[str, float]:
    """What bounds a measurement on the CPU, on one thread: ``lrscope.inspect`` on the
    model of section 1 (and the time its compiled loop took) beside the ``fused=True`` Adam
    step; the compiled Adam loop alone, called directly on the parts of one tensor of
    ``KERNEL_ELEMENTS``; the same generated loop without counting buckets, and with its
    square root and division turned into products (what eta's correctly rounded root and
    division cost); a loop that only reads the three arrays (the memory's floor); the Adam
    loop on data in the cache (its arithmetic alone); and Optax's compiled pass alone
    (``lrscope.jax.fused``) on as many elements of random Adam state.  Seconds per call for
    the first three, per ``KERNEL_ELEMENTS`` elements for the others; medians of ``repeat``."""
    from lrscope.stats import compiled

    torch.set_num_threads(1)
    optimizer, _ = adam_with_state(transformer_shapes(scale))
    fused_adam, _ = adam_with_state(transformer_shapes(scale), fused=True)
    lrscope.inspect(optimizer)  # compiles Adam's kernel
    (kernel,) = torch_fused._kernels.values()  # Adam's, float32: the one this process built
    assert kernel.arrays == ["exp_avg", "exp_avg_sq", "param"], kernel.arrays
    function, in_loop = kernel.function, []

    def timed_loop(*args: Any) -> None:
        start = time.perf_counter()
        function(*args)
        in_loop.append(time.perf_counter() - start)

    kernel.function = timed_loop
    rounds = interleaved_rounds({"inspect": lambda: lrscope.inspect(optimizer),
                                 "fused_adam_step": fused_adam.step}, repeat)
    timings = {name: statistics.median(times) for name, times in rounds.items()}
    timings["inspect_in_loop"] = sum(in_loop) / (repeat + 1)  # (interleaved_rounds warms up once)
    del optimizer, fused_adam

    big, _ = adam_with_state([(KERNEL_ELEMENTS,)])
    calls: list[tuple[Any, ...]] = []
    kernel.function = lambda *args: calls.append(args) or function(*args)
    lrscope.inspect(big)
    kernel.function = function
    # The recorded arguments, each part's arrays and per-step scalars, with buffers of our own
    # for the counts and the row (the worker thread's counts must stay at zero).
    calls = [(*args[:-2], np.zeros(mapping.FLOAT32_BUCKETS, np.int32), np.zeros(len(compiled.STATISTICS)))
             for args in calls]
    formula, loop = kernel.source.split("\ndef kernel(")
    products = formula.replace("np.sqrt(", "(").replace(" / ", " * ")
    assert products.count("*") > formula.count("*") and "sqrt" not in products, formula
    variants = {"kernel": function,
                "without_counting": compiled.compile_kernel(
                    kernel.source.replace("counts[keys[i]] += 1", "pass")),
                "without_root_and_division": compiled.compile_kernel(products + "\ndef kernel(" + loop),
                "read_only": _read_loop()}
    for name, variant in variants.items():
        timings[name] = best_of(lambda f=variant: [f(*args) for args in calls], repeat)
    # The loop on the first CACHED_ELEMENTS of the tensor (768 KiB: they stay in the cache),
    # as many times as covers the tensor: its arithmetic, without waiting for memory.
    cached = (*(array[:CACHED_ELEMENTS].copy() for array in calls[0][:3]), *calls[0][3:])
    laps = KERNEL_ELEMENTS // CACHED_ELEMENTS
    timings["in_cache"] = best_of(lambda: [function(*cached) for _ in range(laps)], repeat) * (
        KERNEL_ELEMENTS / (laps * CACHED_ELEMENTS))
    timings["optax_pass"] = optax_pass(repeat)
    return timings


def _read_loop() -> Callable[..., float]:
    """A compiled loop that only reads the first three arrays of a kernel's arguments (their
    sum; the other arguments are ignored): the memory's floor."""
    import numba

    @numba.njit(nogil=True, fastmath=True)
    def read(a0: np.ndarray, a1: np.ndarray, a2: np.ndarray, *ignored: Any) -> float:
        total = np.float32(0)
        for i in range(a0.size):
            total += a0[i] + a1[i] + a2[i]
        return total

    return read


def optax_pass(repeat: int) -> float:
    """Seconds of Optax's compiled statistics pass alone (``lrscope.jax.stats.compiled_leaf_stats``
    jitted by itself) over ``KERNEL_ELEMENTS`` of random Adam state; NaN without jax."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return math.nan
    from lrscope import formulas
    from lrscope.formulas import adam
    from lrscope.jax.compact import KEPT
    from lrscope.jax.stats import compiled_leaf_stats

    rng = np.random.default_rng(0)
    grad, param = (jnp.asarray(rng.normal(size=KERNEL_ELEMENTS).astype(np.float32)) for _ in range(2))
    mu = jnp.asarray(rng.normal(size=KERNEL_ELEMENTS).astype(np.float32) * 1e-3)
    nu = jnp.asarray(rng.random(KERNEL_ELEMENTS).astype(np.float32) * 1e-6)
    family, hyper = formulas.family("adam"), adam.resolve_hyper("optax", {"lr": 1e-3})
    compute = jax.jit(lambda mu, nu, grad, param, t: compiled_leaf_stats(
        family, {"exp_avg": mu, "exp_avg_sq": nu}, t, hyper, grad, None, param, keep=KEPT))
    t = jnp.asarray(10, jnp.int32)
    return best_of(lambda: jax.block_until_ready(compute(mu, nu, grad, param, t)), repeat)


_KERNEL_CHILD = """
import json, sys
sys.path.insert(0, "benchmarks")
from overhead import kernel_bounds
print(json.dumps(kernel_bounds(float(sys.argv[1]), int(sys.argv[2]))))
"""


def print_kernel_bounds(scale: float, repeat: int) -> None:
    """Section 6, measured in a fresh process (one thread from its start)."""
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHILD, str(scale), str(repeat)], capture_output=True,
                         text=True, check=True)
    k = json.loads(out.stdout.strip().splitlines()[-1])
    n = sum(math.prod(shape) for shape in transformer_shapes(scale))

    def line(label: str, seconds: float, elements: int, extra: str = "") -> None:
        print(f"   {label:44s} {seconds * 1e3:7.1f} ms  {seconds / elements * 1e9:5.2f} ns per element{extra}")

    print(f"\n6. What bounds a measurement on the CPU: one thread (torch.set_num_threads(1)), medians of {repeat} calls")
    line(f"lrscope.inspect, {n / 1e6:.1f}M parameters", k["inspect"], n,
         f"   {k['inspect'] / k['fused_adam_step']:.2f} x the fused=True step")
    line("  of which in the compiled loop", k["inspect_in_loop"], n)
    line("Adam step with fused=True", k["fused_adam_step"], n)
    print(f"   Adam's compiled loop alone, on one tensor of {KERNEL_ELEMENTS / 1e6:.0f}M elements:")
    for name, label in (("kernel", "as lrscope runs it"), ("without_counting", "without counting buckets"),
                        ("without_root_and_division", "root and division made products"),
                        ("read_only", "reading its three arrays, nothing else"),
                        ("in_cache", "as lrscope runs it, on data in the cache")):
        line("  " + label, k[name], KERNEL_ELEMENTS)
    if not math.isnan(k["optax_pass"]):
        line(f"Optax's compiled pass alone, {KERNEL_ELEMENTS / 1e6:.0f}M elements", k["optax_pass"], KERNEL_ELEMENTS)


#: Width of the Optax benchmark's model (``transformer_shapes``): 11.0M parameters in 82 tensors.
OPTAX_SCALE = 0.47
#: Consecutive steps per timed call, as in training: a single step right after another
#: variant's (a measured step's 70 MiB of temporaries) paid for that variant's memory traffic.
OPTAX_STEPS = 4


def optax_ratios(scale: float, repeat: int) -> dict[str, tuple[float, float, int]]:
    """Jitted Adam steps over ``transformer_shapes(scale)``: plain, monitored with
    distributions every step, and between them; per variant the median time, and the
    median of the per-round ratios to its plain step, and the bytes of XLA's temporary
    buffer."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrscope.optax

    shapes = transformer_shapes(scale)
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(shapes))
    params = {f"w{i:03d}": 0.02 * jax.random.normal(keys[i], shape) for i, shape in enumerate(shapes)}
    grads = {f"w{i:03d}": 1e-3 * jax.random.normal(keys[len(shapes) + i], shape)
             for i, shape in enumerate(shapes)}
    between = lrscope.optax.monitor(optax.adam, learning_rate=1e-3, every=10**6)
    # (name, transformation, whether the step donates params and state, as many loops do)
    variants = [
        ("plain optax.adam", optax.adam(1e-3), False),
        ("monitor, distributions every step", lrscope.optax.monitor(optax.adam, learning_rate=1e-3), False),
        ("monitor, steps between distributions", between, False),
        ("... with check=True (keeps the update)", lrscope.optax.monitor(
            optax.adam, learning_rate=1e-3, every=10**6, check=True), False),
        ("plain optax.adam, donated", optax.adam(1e-3), True),
        ("monitor, between, donated", between, True),
    ]
    runs, temp = {}, {}
    for name, tx, donate in variants:  # noqa: B023 - tx is bound as a default argument
        def step(p: Any, state: Any, tx: Any = tx) -> Any:
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
        carry = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params)]

        def run(carry: list = carry, step: Any = step) -> None:
            for _ in range(OPTAX_STEPS):
                carry[:] = step(*carry)
            jax.block_until_ready(carry[0])

        run()  # compile, and pass step 1 (distributions) for the every=10**6 variants
        runs[name] = run
        # XLA's temporary buffer for one step (allocated on every step, distributions or not)
        temp[name] = step.lower(*carry).compile().memory_analysis().temp_size_in_bytes
    rounds = {name: [t / OPTAX_STEPS for t in times]
              for name, times in interleaved_rounds(runs, repeat).items()}
    plain = {False: rounds["plain optax.adam"], True: rounds["plain optax.adam, donated"]}
    return {name: (statistics.median(times),
                   statistics.median(t / p for t, p in zip(times, plain[name.endswith("donated")])),
                   temp[name]) for name, times in rounds.items()}


def keras_ratios(tensors: int, repeat: int) -> dict[str, float]:
    """Keras 3 Adam on the backend KERAS_BACKEND names: optimizer.apply vs lrscope.inspect."""
    import keras
    import numpy as np

    import lrscope.keras  # noqa: F401  (registers nothing; makes the dependency explicit)

    rng = np.random.default_rng(0)
    variables = [keras.Variable(0.02 * rng.standard_normal((500, 500), dtype="float32"))
                 for _ in range(tensors)]
    grads = [keras.ops.convert_to_tensor(1e-3 * rng.standard_normal((500, 500), dtype="float32"))
             for _ in range(tensors)]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.apply(grads, variables)
    first_s = timed(lambda: lrscope.inspect(optimizer))  # traces or compiles the statistics
    rounds = interleaved_rounds({"apply": lambda: optimizer.apply(grads, variables),
                                 "inspect": lambda: lrscope.inspect(optimizer)}, repeat)
    ratios = [a / b for a, b in zip(rounds["inspect"], rounds["apply"])]
    return {**{name: statistics.median(times) for name, times in rounds.items()}, "first_s": first_s,
            "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


_KERAS_CHILD = """
import json, sys
sys.path.insert(0, "benchmarks")
from overhead import keras_ratios
print(json.dumps(keras_ratios(int(sys.argv[1]), int(sys.argv[2]))))
"""


def keras_on(backend: str, tensors: int, repeat: int) -> dict[str, float]:
    """``keras_ratios`` in a fresh process (Keras picks its backend once per process)."""
    out = subprocess.run([sys.executable, "-c", _KERAS_CHILD, str(tensors), str(repeat)],
                         env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_optax(scale: float, repeat: int) -> None:
    try:
        import jax

        o = optax_ratios(scale, repeat)
    except ImportError as error:
        print(f"\n4. Optax: skipped ({error})")
        return
    (plain, _, plain_temp), (donated, _, _) = o.pop("plain optax.adam"), o.pop("plain optax.adam, donated")
    n = sum(math.prod(shape) for shape in transformer_shapes(scale)) / 1e6
    print(f"\n4. Optax (jitted, {jax.default_backend()}), Adam over {n:.1f}M parameters in transformer shapes "
          f"({repeat} interleaved rounds; ratios are medians of per-round ratios): plain step {plain * 1e3:.1f} ms "
          f"({donated * 1e3:.1f} ms with params and state donated); XLA temporary buffer per step "
          f"{plain_temp / 2**20:.1f} MiB")
    goals = {"monitor, distributions every step": "   (goal <= 2.0: adds at most one plain step)",
             "monitor, steps between distributions": "   (goal <= 1.05)", "monitor, between, donated": "   (goal <= 1.05)"}
    for name, (seconds, ratio, temp) in o.items():
        print(f"   {name:38s} {seconds * 1e3:8.1f} ms  {ratio:6.2f} x the plain step"
              f"   temporary buffer {temp / 2**20:5.1f} MiB{goals.get(name, '')}")


def print_other_frameworks(tensors: int, repeat: int, optax_scale: float) -> None:
    print_optax(optax_scale, repeat)
    print_keras(tensors, repeat)


def print_keras(tensors: int, repeat: int) -> None:
    n = tensors * 250_000 / 1e6
    print(f"\n5. Keras 3, Adam over {n:.0f}M parameters: lrscope.inspect against optimizer.apply "
          f"({repeat} interleaved rounds; ratios are medians of per-round ratios)")
    for backend in ("tensorflow", "jax", "torch"):
        try:
            k = keras_on(backend, tensors, repeat)
        except RuntimeError as error:
            print(f"   {backend:10s} skipped ({error})")
            continue
        print(f"   {backend:10s} apply {k['apply'] * 1e3:7.1f} ms   lrscope distributions "
              f"{k['inspect'] * 1e3:7.1f} ms  {k['ratio']:5.2f} x the step (rounds {k['low']:.2f}-{k['high']:.2f})"
              f"   first call {k['first_s']:.1f} s{'   (goal <= 0.5)' if backend != 'torch' else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    parser.add_argument("--torch", action="store_true", help="only the PyTorch sections (1-3)")
    parser.add_argument("--optax", action="store_true", help="only the Optax section (4)")
    parser.add_argument("--keras", action="store_true", help="only the Keras section (5)")
    parser.add_argument("--kernel", action="store_true", help="only what bounds a CPU measurement (6)")
    parser.add_argument("--device", default="cpu", help="where PyTorch's tensors live: cpu (default) or cuda")
    parser.add_argument("--scale", type=float, help="model width (1: 49.8M parameters; default 1, 0.1 with --quick); "
                        f"with --optax, the Optax model's (default {OPTAX_SCALE}: 11.0M parameters)")
    args = parser.parse_args()
    scale, repeat = (0.1, 3) if args.quick else (1.0, 9)
    scale, device = args.scale or scale, args.device
    if args.optax:
        print_optax(args.scale or (0.1 if args.quick else OPTAX_SCALE), repeat)
        return
    if args.keras:
        print_keras(4 if args.quick else 40, repeat)
        return
    if args.kernel:
        print_kernel_bounds(scale, repeat)
        return
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    layout = (f"Triton kernel: blocks of {triton_kernel.BLOCK:,} elements, up to {triton_kernel.GROUP_TENSORS} "
              f"tensors per launch; eager: chunks and batches of {torch_small.DEVICE_BATCH_ELEMENTS:,} elements, "
              f"segments reduced in pieces of {torch_stats.PIECE_ELEMENTS:,}" if device == "cuda" else
              f"chunks = {torch_stats.CHUNK_ELEMENTS:,} elements (eager), parts of {torch_fused.PART_ELEMENTS:,} "
              "(compiled kernel)")
    print(f"torch {torch.__version__}, {where}, {layout}")

    d = distributions(scale, repeat, device)
    r = d["rounds"]
    step = statistics.median(r["adam_step"])
    per_round = {name: [a / b for a, b in zip(r[name], r["adam_step"])] for name in r}
    print(f"\n1. Full distributions, Adam, {d['parameters'] / 1e6:.1f}M parameters "
          f"({repeat} interleaved rounds; ratios are medians of per-round ratios)")
    print(f"   Adam step                    {step * 1e3:8.1f} ms")
    compiled = "Triton kernel" if device == "cuda" else "numba kernel"
    for name, label in (("fused_adam_step", "Adam step with fused=True"), ("foreach_adamw_step", "AdamW step, foreach"),
                        ("read_once", "one read of exp_avg_sq"), ("lrscope", f"lrscope ({compiled})"),
                        ("eager", "... eager (LRSCOPE_FUSED=0)"),
                        *((name, label) for name, (label, _) in PEERS.items())):
        if name in r:
            ratios = per_round[name]
            print(f"   {label:29s}{statistics.median(r[name]) * 1e3:8.1f} ms  "
                  f"{statistics.median(ratios):5.2f} x the step  (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    lrscope_s = statistics.median(r["lrscope"])
    print(f"   ratio to the Adam step     {statistics.median(per_round['lrscope']):8.2f} x   (goal <= 0.3)")
    print(f"   ratio to one read pass     {lrscope_s / statistics.median(r['read_once']):8.2f} x")
    print(f"   ratio to the naive monitor {lrscope_s / d['naive_s']:8.2f} x   (naive: {d['naive_s'] * 1e3:.0f} ms)")
    fused_ratios = [a / b for a, b in zip(r["lrscope"], r["fused_adam_step"])]
    print(f"   ratio to the fused=True Adam step {statistics.median(fused_ratios):.2f} x   (goal <= 1.0)")
    if d["cpu"]:
        cpu = d["cpu"]
        print(f"   CPU time of all threads: lrscope {cpu['lrscope'] * 1e3:.1f} ms, fused=True Adam step "
              f"{cpu['fused_adam_step'] * 1e3:.1f} ms: {cpu['lrscope'] / cpu['fused_adam_step']:.2f} x")
    if "foreach_adamw_step" in r:
        adamw_ratios = [a / b for a, b in zip(r["lrscope"], r["foreach_adamw_step"])]
        eager_ratios = [a / b for a, b in zip(r["eager"], r["foreach_adamw_step"])]
        print(f"   ratio to the foreach AdamW step {statistics.median(adamw_ratios):.2f} x   (goal <= 0.3; "
              f"eager {statistics.median(eager_ratios):.2f} x)")
    print(f"   first call, which compiles the {compiled}: {d['first_s']:.1f} s")

    s = scalars_only(repeat, device)
    print("\n2. Scalars only, every step, small MLP (batch 128)")
    print(f"   training step                {s['train_step_s'] * 1e6:8.0f} us")
    print(f"   added by watch (in step())   {s['added_s'] * 1e6:8.1f} us   (calling thread's CPU time; "
          f"wall clock {s['added_wall_s'] * 1e6:.1f} us)")
    print(f"   overhead                     {s['added_s'] / s['train_step_s'] * 100:8.2f} %   (goal <= 1 %)")
    print(f"   added to a 1-element step   {s['hooks_s'] * 1e6:8.1f} us = {s['hooks_s'] / s['train_step_s'] * 100:.2f} % "
          "of the training step   (the same hooks, the same work, on a 20 us AdamW step: resolved to < 1 us)")
    print(f"   ... writing every step to JSONL {(s['jsonl_step_s'] / s['train_step_s'] - 1) * 100:5.1f} %"
          "   (whole steps; the sink's thread competes for the cores)")

    what = "RSS" if device == "cpu" else "GPU memory"
    print(f"\n3. Extra peak memory ({what}) while computing distributions, 5 calls")
    for label, s in (("this model", scale), ("a quarter of it", scale / 4)):
        kib = memory(s, device)["extra_peak_kib"]
        print(f"   {label:16s} median {kib[2] / 1024:6.1f} MiB, max {kib[-1] / 1024:6.1f} MiB")
    if device == "cpu":
        print(f"   (a block of {KERNEL_BLOCK:,} elements and {mapping.FLOAT32_BUCKETS * 4 >> 10} KiB of "
              "bucket counts per worker thread,"
              f" half-precision parts copied in float32 ({torch_fused.PART_ELEMENTS * 4 >> 20} MiB per tensor), "
              f"small tensors in batches of up to {torch_small.BATCH_ELEMENTS:,} elements; the rest is the C "
              "allocator's heap growth)")
    else:
        print(f"   (the temporaries of one chunk or batch of {torch_small.DEVICE_BATCH_ELEMENTS:,} elements, "
              "and each tensor's packed counts until the step's one transfer)")
        counts = synchronisations(steps=30, every=10)
        print("\n   Synchronisations per optimizer step (JSONL sink, every=10; foreach, fused, capturable "
              f"AdamW):\n   with distributions {sorted(set(counts[True]))}, "
              f"without {sorted(set(counts[False]))} (over {len(counts[False])} steps)")

    if not args.torch:
        print_other_frameworks(4 if args.quick else 40, repeat, 0.1 if args.quick else OPTAX_SCALE)
    if device == "cpu":
        print_kernel_bounds(scale, repeat)


if __name__ == "__main__":
    main()
