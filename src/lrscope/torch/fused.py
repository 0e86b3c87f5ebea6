"""One fused pass for the statistics of large CPU tensors.

Eager PyTorch runs one kernel, so one pass over memory, per operation: the family's
formula, then min/max, sums, norms, the eps-dominated count and the bucket counts, a dozen
passes per chunk.  Here ``torch_kernel`` turns the family's formula (``formulas/``: there
is no second copy of it) into one numba loop that computes eta and every statistic with it,
bucket counts included, reading each state tensor once; tensors are cut into parts that
worker threads (as many as PyTorch's intra-op threads) take in turn, each counting into its
own row.  Per-step scalars (t, lr, beta powers) are arguments, so a new step compiles
nothing; a family, option set or dtype compiles once (about a second).

Used for tensors of at least ``FUSED_MIN_ELEMENTS`` on the CPU, with numba installed (it
comes with ``lrscope[torch]``), and for smaller ones whose kernel is compiled already (see
``COMPILED_MIN_ELEMENTS``).  GPU tensors keep the eager path (their kernels already run
at memory speed).  Set ``LRSCOPE_FUSED=0`` to switch it off; if a formula cannot be
compiled, lrscope warns once and measures it eagerly.

The statistics are those of ``stats.reduce`` up to the order of the sums: eta is
computed operation by operation in the dtype torch computes it in.  bfloat16/float16 state
is computed in float32 copies (numba has no bfloat16), without rounding every
intermediate to the state's dtype as eager kernels do, so min/max/eta may differ from the
eager values by about one unit of that dtype (0.4 % in bfloat16).
``lrscope.torch.elementwise`` stays eager and exact.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lrscope._warnings import warn
from lrscope._fast import fast_statistics
from lrscope.torch import stats
from lrscope.torch.kernel import STATISTICS, Kernel
from lrscope.formulas import Elementwise
from lrscope.report import decode_statistics, mark_eps_absent
from lrscope.stats import mapping
from lrscope.stats.sketch import merge_stores

#: Tensors smaller than this (at most 65,536 elements, 256 KiB in float32) are measured
#: together (``small``) until a larger tensor has compiled their kernel: a model made only
#: of them (a test, the demo) never waits for a compilation.
FUSED_MIN_ELEMENTS = (1 << 16) + 1
#: Tensors of at least this many elements, but fewer than ``FUSED_MIN_ELEMENTS``, are
#: measured by the kernel once a larger tensor has compiled it (one pass, where measuring
#: them together in ``small`` takes a dozen); the smaller ones (biases, norms) stay
#: together in ``small``: one formula call for many costs less than a kernel call each.
COMPILED_MIN_ELEMENTS = stats.NUMPY_ELEMENTS + 1
#: Elements per kernel call, each a task for the worker threads (a large tensor is
#: several); half-precision state is converted to float32 copies of this size (4 MiB).
PART_ELEMENTS = 1 << 20

#: Families left eager: RAdam picks its regime with a Python branch on t, which a
#: kernel would have to compile for every new t.
EAGER_FAMILIES = {"radam"}

_kernels: dict[tuple[Any, ...], "Kernel | None"] = {}


@dataclass
class ChunkedFormula:
    """A family's formula over flat chunks of one parameter's state.

    ``apply(family, view, t, h, dtype) -> Elementwise`` is a module-level function, so
    the compiled caller sees the same object for every parameter and does not recompile.
    """

    apply: Callable[..., Elementwise]
    family: str
    view: dict[str, Any]
    t: Any
    h: dict[str, Any]
    dtype: torch.dtype

    @functools.cached_property
    def parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The view's per-element tensors, flattened, and the rest (scalars, 0-d tensors).
        A one-element parameter keeps its state whole (a 0-d scalar is not told apart from it);
        an empty one flattens its empty state, shaped like the empty chunk it is sliced to."""
        numel = self.view["param"].numel()
        flat = {k: v.reshape(-1) for k, v in self.view.items()
                if isinstance(v, torch.Tensor) and v.numel() == numel and numel != 1}
        return flat, {k: v for k, v in self.view.items() if k not in flat}

    @functools.cached_property
    def inputs(self) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]]:
        """Its kernel's scalar arguments, constants and key (``_inputs``)."""
        return _inputs(self)

    def __call__(self, chunk: slice) -> Elementwise:
        """The Elementwise of the flat slice ``chunk`` (eagerly)."""
        flat, rest = self.parts
        return self.apply(self.family, {**rest, **{k: v[chunk] for k, v in flat.items()}},
                          self.t, self.h, self.dtype)


def applies(compute: Callable[[slice], Elementwise], param: torch.Tensor, finite_only: bool) -> bool:
    """Whether ``param``'s statistics take the fused path: a large tensor, or a smaller one
    (of at least ``COMPILED_MIN_ELEMENTS``) whose kernel a large tensor has already compiled."""
    return (isinstance(compute, ChunkedFormula) and compute.family not in EAGER_FAMILIES
            and not finite_only and param.device.type == "cpu"
            and (param.numel() >= FUSED_MIN_ELEMENTS
                 or param.numel() >= COMPILED_MIN_ELEMENTS and _kernels.get(compute.inputs[2]) is not None)
            and fast_statistics() and _numba_installed() and not torch.compiler.is_compiling())


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def reduce(compute: Callable[[slice], Elementwise], param: torch.Tensor, finite_only: bool = False) -> Any:
    """``stats.reduce``, fused when ``compute`` is a ChunkedFormula and ``applies``."""
    if applies(compute, param, finite_only):
        kernel, scalars = _kernel(compute)
        if kernel is not None:
            return _fused(compute, kernel, scalars, param)
    return stats.reduce(compute, param, finite_only)


def _inputs(formula: ChunkedFormula) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]]:
    """The formula's per-step values as kernel arguments (t, lr, the state's scalars such as
    Adam's beta powers, tensor hyperparameters: 0-d tensors when traced), its constants
    (the other hyperparameters, baked into the kernel), and the key of its kernel."""
    flat, rest = formula.parts
    h_scalars, h_constants, h_key = _hyperparameter_inputs(formula.h)
    scalars, constants = {}, {}
    for name, value in {"t": formula.t, **{f"view.{k}": v for k, v in rest.items()}}.items():
        _classify(name, value, scalars, constants, per_step=True)
    key = (formula.apply, formula.family, formula.dtype,
           tuple((k, v.dtype) for k, v in flat.items()),
           tuple((k, v.dtype if isinstance(v, torch.Tensor) else float) for k, v in scalars.items()),
           repr(sorted(constants.items())), h_key)
    return {**scalars, **h_scalars}, {**constants, **h_constants}, key


def _classify(name: str, value: Any, scalars: dict[str, Any], constants: dict[str, Any], per_step: bool) -> None:
    """``value`` into ``scalars`` (an argument of the kernel: a 0-d tensor, or a ``per_step``
    number) or ``constants`` (baked into it)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 or (
            per_step and isinstance(value, (int, float)) and not isinstance(value, bool)):
        scalars[name] = value
    else:
        constants[name] = value


#: ``_hyperparameter_inputs`` of the latest hyperparameter dicts, by identity (each entry
#: holds its dict, so the identity is not reused): one dict per parameter group and step,
#: shared by the group's tensors.
_hyperparameter_cache: dict[int, tuple[dict[str, Any], Any]] = {}


def _hyperparameter_inputs(h: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]]:
    """``_inputs`` of a formula's hyperparameters ``h`` (``h.lr`` a per-step value), and
    their part of the kernel's key."""
    cached = _hyperparameter_cache.get(id(h))
    if cached is not None and cached[0] is h:
        return cached[1]
    scalars: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for k, v in h.items():
        _classify(f"h.{k}", v, scalars, constants, per_step=k == "lr")
    key = (tuple((k, v.dtype if isinstance(v, torch.Tensor) else float) for k, v in scalars.items()),
           repr(sorted(constants.items())))
    if len(_hyperparameter_cache) >= 16:
        _hyperparameter_cache.pop(next(iter(_hyperparameter_cache)))
    _hyperparameter_cache[id(h)] = (h, (scalars, constants, key))
    return scalars, constants, key


def _kernel(formula: ChunkedFormula) -> tuple[Kernel | None, dict[str, Any]]:
    """The compiled kernel of ``formula`` (built on first use of its key: about a second)
    and its scalar arguments; None if it cannot be built (warned once per key)."""
    scalars, constants, key = formula.inputs
    if key not in _kernels:
        _kernels[key] = _build(formula, scalars, constants)
    arguments = {name: _argument(value) for name, value in scalars.items()}
    return _kernels[key], arguments


def traceable(formula: ChunkedFormula, scalars: dict[str, Any], constants: dict[str, Any]
              ) -> tuple[Callable[..., tuple[Any, Any, Any]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``formula`` as a function of its per-element tensors and per-step scalars (``_inputs``),
    returning (eta, eps_dominated or None, update), with example arrays and scalars for
    ``kernel.trace``: shared by the numba kernel and ``triton_kernel``."""
    flat = formula.parts[0]
    # Examples of a few elements; half precision is computed in float32 (``_part``).
    arrays = {k: torch.ones(4, dtype=_computed_in(v.dtype)) for k, v in flat.items()}

    def traced(view: dict[str, torch.Tensor]) -> tuple[Any, Any, Any]:
        given = {**constants, **view}
        state = {k.removeprefix("view."): v for k, v in given.items() if k.startswith("view.")}
        state.update({k: v for k, v in view.items() if k in arrays})
        h = {k.removeprefix("h."): v for k, v in given.items() if k.startswith("h.")}
        el = formula.apply(formula.family, state, given["t"], h, formula.dtype)
        return stats.eta_tensor(el), el.eps_dominated, el.update(view["param"])

    examples = {name: value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
                for name, value in scalars.items()}
    return traced, arrays, examples


def _build(formula: ChunkedFormula, scalars: dict[str, Any], constants: dict[str, Any]) -> Kernel | None:
    try:
        numbers = frozenset(name for name, value in scalars.items() if not isinstance(value, torch.Tensor))
        return Kernel.build(*traceable(formula, scalars, constants), numbers)
    except Exception as error:  # noqa: BLE001 - any tracing or compiler failure: stay correct, go eager
        warn(f"lrscope: the compiled statistics of {formula.family} failed ({type(error).__name__}: "
             f"{error}); computing them eagerly (slower, same results)")
        return None


def _computed_in(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision state (numba has no bfloat16), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _argument(value: Any) -> Any:
    """A scalar as the numpy scalar the kernel was compiled for (a Python number is float64)."""
    return value.detach().numpy()[()] if isinstance(value, torch.Tensor) else np.float64(value)


def _fused(formula: ChunkedFormula, kernel: Kernel, scalars: dict[str, Any],
           param: torch.Tensor) -> stats.Pending:
    """The statistics of ``param``, its parts queued on the worker threads."""
    # numpy views of the whole tensors, sliced per part; half precision converted per part.
    flat = {k: v.numpy() if v.dtype == _computed_in(v.dtype) else v for k, v in formula.parts[0].items()}
    n = param.numel()
    tasks = [functools.partial(_part, kernel, flat, scalars, start, min(start + PART_ELEMENTS, n))
             for start in range(0, n, PART_ELEMENTS)]
    return stats.Pending(tasks, functools.partial(_combine, has_eps=kernel.has_eps), _run_tasks)


def _combine(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], has_eps: bool) -> Any:
    """A tensor's statistics (``stats.Accumulator.result``) from its parts' rows and nonzero
    bucket counts (``_part``)."""
    rows = np.stack([row for row, _, _ in parts])
    totals = np.concatenate([[rows[:, 0].min(), rows[:, 1].max()], rows[:, 2:].sum(axis=0)])
    if not has_eps:
        mark_eps_absent(totals)
    indices, counts = parts[0][1:] if len(parts) == 1 else merge_stores([part[1:] for part in parts])
    return decode_statistics(counts, totals, indices)


def _part(kernel: Kernel, flat: dict[str, np.ndarray | torch.Tensor], scalars: dict[str, Any],
          start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On a worker thread: the ``torch_stats`` row of the flat range ``start:stop`` and the
    indices and counts of its nonzero buckets.  The thread's int32 row of bucket counts is
    kept at zero between parts: only the buckets between the part's extremes are read and
    cleared (a few hundred of 32,768), where they bound it."""
    counts = getattr(_thread, "counts", None)
    if counts is None:
        counts = _thread.counts = np.zeros(mapping.FLOAT32_BUCKETS, np.int32)
    arrays = {k: v[start:stop] if isinstance(v, np.ndarray) else v[start:stop].to(_computed_in(v.dtype)).numpy()
              for k, v in flat.items()}
    row = np.empty(len(STATISTICS))
    kernel.run(arrays, scalars, counts, row)
    first, last = mapping.float32_bucket_span(row[0], row[1])
    window = counts[first:last + 1]
    indices = np.flatnonzero(window)
    found = window[indices].astype(np.int64)
    window[indices] = 0
    return row, indices + first, found


_thread = threading.local()


def _run_tasks(tasks: list[Callable[[], Any]]) -> list[Any]:
    """The results of ``tasks`` (in order), run by the worker threads: one job per thread,
    each taking the next task until none is left, rather than a job per task (a thread's
    wake-up per task cost more than some of the tasks)."""
    results: list[Any] = [None] * len(tasks)
    order = iter(range(len(tasks)))  # shared: each index is taken by one thread (atomic under the GIL)

    def work() -> None:
        for index in order:
            results[index] = tasks[index]()

    pool, threads = _pool()
    for job in [pool.submit(work) for _ in range(min(threads, len(tasks)))]:
        job.result()  # (raises a task's error)
    return results


@functools.cache
def _pool_of(threads: int, process: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, "lrscope")


def _pool() -> tuple[ThreadPoolExecutor, int]:
    """Worker threads, as many as PyTorch's intra-op threads, of this process (a forked
    child has none of its parent's threads), and their number."""
    threads = max(1, torch.get_num_threads())
    return _pool_of(threads, os.getpid()), threads
