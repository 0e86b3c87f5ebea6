"""One fused pass per chunk for the statistics of large CPU tensors.

Eager PyTorch runs one kernel, so one pass over memory, per operation: the family's
formula, then min/max, sums, norms and the eps-dominated count, a dozen passes per
chunk.  Here ``torch.compile`` (Inductor, a C++ compiler at run time) traces the same
family formula (``formulas/``: there is no second copy of it) together with every
reduction into one C++ kernel that reads each state tensor once and writes eta as
float32 (Inductor splits it into three vectorised loops over the chunk: eta and the
eps-dominated count; the extremes, sums and update norm; the parameter norm); the bucket
counts of eta are then taken by ``stats.bit_histogram``.  Per-step scalars (t, lr, beta
powers) are 0-d inputs, so a new step compiles nothing.

Used for tensors of at least ``FUSED_MIN_ELEMENTS`` on the CPU: the first compilation
takes seconds, which pays off only on large models.  Chunks of ``CHUNK_SIZES`` go through
loops compiled for their static size; the rest of a tensor (all of it below the smallest
size) through one loop compiled for any size, about twice slower per element but still
several times faster than eager kernels, which allocate a fresh temporary per operation
(the C allocator may hand each one out as fresh pages from the kernel: 40 tensors of 250K
page-faulted 43,000 times per measurement in some processes, 71 ms eager against 10 ms).
GPU tensors keep the eager path (their kernels already run at memory speed).  Set
``LRSCOPE_FUSED=0`` to switch it off;
if compilation fails (no C++ compiler), lrscope warns once and stays eager.  Dynamo keeps
at most ``torch._dynamo.config.recompile_limit`` variants (family, options, dtype, chunk
size) of the compiled pass; beyond them it runs the pass eagerly, with the same results.

The statistics are those of ``torch_stats.reduce`` up to float32 rounding: Inductor may
reorder a division into a multiplication by the reciprocal (1 ulp on eta), far inside
the sketch's 1 % quantile accuracy.  For bfloat16/float16 state, Inductor computes in
float32 without rounding every intermediate to the state's dtype as eager kernels do, so
min/max/eta may differ from the eager values by about one unit of that dtype (0.4 % in
bfloat16).  ``lrscope.torch.elementwise`` stays eager and exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lrscope._warnings import warn
from lrscope.backends import fast_statistics, torch_stats
from lrscope.formulas import Elementwise

#: Tensors smaller than this (at most 65,536 elements, 256 KiB in float32) use the eager
#: path: they are cheap, and a model made only of them (a test, the demo) never waits for a
#: compilation.
FUSED_MIN_ELEMENTS = (1 << 16) + 1
#: Chunk sizes of the compiled pass, largest first (the temporary memory is a few
#: buffers of the largest: 4 MiB each in float32).
CHUNK_SIZES = (4 * torch_stats.CHUNK_ELEMENTS, torch_stats.CHUNK_ELEMENTS)

#: Families left eager: RAdam picks its regime with a Python branch on t, so a compiled
#: pass would compile again for every new t (measured: 3.5x slower than eager).
EAGER_FAMILIES = {"radam"}

_compiled: dict[bool, Callable[..., Any]] = {}  # by whether compiled for any size
_failed = False


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
        """The view's per-element tensors, flattened, and the rest (scalars, 0-d tensors)."""
        numel = self.view["param"].numel()
        flat = {k: v.reshape(-1) for k, v in self.view.items()
                if isinstance(v, torch.Tensor) and v.numel() == numel and numel > 1}
        return flat, {k: v for k, v in self.view.items() if k not in flat}

    def sliced(self, chunk: slice, rest: dict[str, Any] | None = None) -> dict[str, Any]:
        """The view over the flat slice ``chunk``, with ``rest`` in place of its scalars."""
        flat, own_rest = self.parts
        return {**(own_rest if rest is None else rest), **{k: v[chunk] for k, v in flat.items()}}

    def __call__(self, chunk: slice) -> Elementwise:
        return self.apply(self.family, self.sliced(chunk), self.t, self.h, self.dtype)


def _chunk_statistics(apply: Callable[..., Elementwise], family: str, view: dict[str, Any], t: Any,
                      h: dict[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """eta (float32, or 0-d when one eta serves the whole chunk), the ``torch_stats`` row
    (min, max, sum, sum of squares, eps-dominated count, update and parameter squared
    norms) in float64, and whether the family has an eps term."""
    el = apply(family, view, t, h, dtype)
    theta = view["param"]
    eta = torch_stats.eta_tensor(el)
    # (Broadcasting a full-size eta would split Inductor's loop in two.)
    wide = eta.double() if eta.dim() else eta.double().expand(theta.shape)
    update = el.update(theta).double()
    eps = el.eps_dominated
    row = torch.stack([wide.amin(), wide.amax(), wide.sum(), (wide * wide).sum(),
                       eps.double().sum() if eps is not None else wide.new_zeros(()),
                       (update * update).sum(), theta.double().square().sum()])
    return eta.float(), row, eps is not None


def applies(compute: Callable[[slice], Elementwise], param: torch.Tensor, finite_only: bool) -> bool:
    """Whether ``param``'s statistics take the fused path."""
    return (isinstance(compute, ChunkedFormula) and compute.family not in EAGER_FAMILIES
            and not _failed and not finite_only and param.device.type == "cpu"
            and param.numel() >= FUSED_MIN_ELEMENTS and fast_statistics()
            and not torch.compiler.is_compiling())


def _compile(dynamic: bool) -> Callable[..., Any]:
    """The compiled pass: for static shapes (each chunk size its own loop) or for any size;
    per-step scalars are 0-d inputs either way."""
    if dynamic not in _compiled:
        _compiled[dynamic] = torch.compile(_chunk_statistics, dynamic=dynamic)
    return _compiled[dynamic]


def reduce(compute: Callable[[slice], Elementwise], param: torch.Tensor, finite_only: bool = False) -> Any:
    """``torch_stats.reduce``, fused when ``compute`` is a ChunkedFormula and ``applies``."""
    global _failed
    if applies(compute, param, finite_only):
        try:
            return _fused(compute, param)
        except Exception as error:  # noqa: BLE001 - any compiler failure: stay correct, go eager
            _failed = True
            warn(f"lrscope: torch.compile failed ({type(error).__name__}: {error}); "
                 "computing statistics eagerly from now on (slower, same results)")
    return torch_stats.reduce(compute, param, finite_only)


def _as_input(value: Any) -> Any:
    """A per-step scalar (t, lr, Adam's beta powers, NAdam's mu_product) as a 0-d float64
    tensor: the compiled pass takes it as an input, rather than baking in its value and
    compiling again (seconds) when it changes."""
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, (int, float)) \
        and not isinstance(value, bool) else value


def _fused(formula: ChunkedFormula, param: torch.Tensor) -> Any:
    """Chunks of ``CHUNK_SIZES`` through the static compiled passes, the rest through the
    pass for any size.

    Each chunk size is its own static compiled loop: one compiled for any size is about
    twice slower (Inductor's dynamic-shape loops), and a call costs tens of microseconds of
    guards and wrappers, so large tensors go in the larger chunks.
    """
    static, any_size = _compile(False), _compile(True)
    acc = torch_stats.Accumulator(param.device)
    rest = {k: _as_input(v) for k, v in formula.parts[1].items()}
    t, h = _as_input(formula.t), {**formula.h, "lr": _as_input(formula.h["lr"])}

    def measure(statistics: Callable[..., Any], start: int, stop: int) -> None:
        view = formula.sliced(slice(start, stop), rest)
        eta, row, has_eps = statistics(formula.apply, formula.family, view, t, h, formula.dtype)
        acc.add_row(eta, row, has_eps, stop - start)

    start, n = 0, param.numel()
    # Each (family, options, dtype, chunk size) is one compiled variant: more than dynamo's
    # default of 8 (e.g. AdamW groups with and without decay, in two dtypes) would send
    # the rest to an eager run of the same function, slower than torch_stats.
    with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
        for size in CHUNK_SIZES:
            while n - start >= size:
                measure(static, start, start + size)
                start += size
        if start < n:
            measure(any_size, start, n)
    return acc.result()
