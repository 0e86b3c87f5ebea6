"""Distribution statistics of torch tensors, computed where the tensors live.

One pass per chunk: float32 bit buckets (``mapping``) counted with ``bincount``,
exact min/max/sum/sum of squares, the eps-dominated count and the update and
parameter squared norms.  Everything stays on the device until ``to_host`` moves all
tensors of a step in one transfer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lrscope.formulas import Elementwise
from lrscope.report import Distribution
from lrscope.stats import LogSketch, mapping

#: Elements processed at once: bounds the temporary memory to a few buffers this size
#: (1 MiB each in float32), whatever the model size; measured fastest on 2 CPU cores
#: (benchmarks/overhead.py): larger chunks fall out of cache.
CHUNK_ELEMENTS = 1 << 18
_MASK = mapping.FLOAT32_BUCKETS - 1
# Layout of the per-tensor statistics vector: bucket counts, then these scalars.
_SCALARS = ("min", "max", "sum", "sum_squares", "eps_dominated", "update_sq", "param_sq", "has_eps")


def _buckets(values: torch.Tensor) -> torch.Tensor:
    bits = values.to(torch.float32).reshape(-1).view(torch.int32)
    return torch.bincount((bits >> mapping.FLOAT32_SHIFT) & _MASK, minlength=mapping.FLOAT32_BUCKETS)


def _extremes(values: torch.Tensor, finite_only: bool) -> list[torch.Tensor]:
    """min, max, sum and sum of squares, without a host sync.

    The fast path reduces everything; a NaN/Inf then shows in the sum, and the caller
    redoes that tensor with ``finite_only`` (masking costs three more passes).
    """
    flat = values.reshape(-1)
    if not finite_only:
        low, high = torch.aminmax(flat)
        return [low, high, flat.sum(), torch.dot(flat, flat)]
    inf = math.inf
    finite = flat.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return [flat.nan_to_num(nan=inf, posinf=inf, neginf=inf).amin(),
            flat.nan_to_num(nan=-inf, posinf=-inf, neginf=-inf).amax(),
            finite.sum(), torch.dot(finite, finite)]


def _squared_norm(values: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if values is None:
        return like.new_zeros(())
    flat = values.reshape(-1)
    return torch.dot(flat, flat)


class Accumulator:
    """Statistics of one tensor over its chunks, kept on the device until ``packed``.

    Each chunk appends one row (min, max, sum, sum of squares, update and parameter
    squared norms) in the data's own dtype: converting per chunk would cost more small
    kernels than the statistics themselves.
    """

    def __init__(self, device: torch.device, finite_only: bool = False):
        self.device = device
        self.finite_only = finite_only
        self.counts = torch.zeros(mapping.FLOAT32_BUCKETS, dtype=torch.int64, device=device)
        self.rows: list[torch.Tensor] = []
        self.eps_counts: list[torch.Tensor] = []

    def add(self, values: torch.Tensor, eps_dominated: Any, update: torch.Tensor | None,
            param: torch.Tensor) -> None:
        values = values.detach()
        n = param.numel()
        if values.dim() == 0:  # one eta for the whole chunk (SGD): no per-element work
            self.counts += _buckets(values) * n
            extremes = [values, values, values * n, values * values * n]
        else:
            self.counts += _buckets(values)
            extremes = _extremes(values, self.finite_only)
        if eps_dominated is not None:
            self.eps_counts.append(torch.as_tensor(eps_dominated, device=self.device).sum())
        row = extremes + [_squared_norm(update, param), _squared_norm(param, param)]
        dtype = row[0].dtype
        for r in row[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        self.rows.append(torch.stack([r if r.dtype == dtype else r.to(dtype) for r in row]))

    def packed(self) -> torch.Tensor:
        """Bucket counts then ``_SCALARS`` as one float64 vector."""
        rows = torch.stack([r.double() for r in self.rows]) if len({r.dtype for r in self.rows}) > 1 \
            else torch.stack(self.rows).double()
        eps = torch.stack(self.eps_counts).sum().double().reshape(1) if self.eps_counts \
            else rows.new_zeros(1)
        has_eps = rows.new_full((1,), float(bool(self.eps_counts)))
        return torch.cat([self.counts.double(), rows[:, 0].amin().reshape(1), rows[:, 1].amax().reshape(1),
                          rows[:, 2:4].sum(0), eps, rows[:, 4:].sum(0), has_eps])


def chunks(param: torch.Tensor) -> list[slice]:
    n = param.numel()
    return [slice(start, min(start + CHUNK_ELEMENTS, n)) for start in range(0, max(n, 1), CHUNK_ELEMENTS)]


def reduce(compute: Callable[[slice], Elementwise], param: torch.Tensor,
           finite_only: bool = False) -> torch.Tensor:
    """Packed statistics of eta over ``param``, chunk by chunk.

    ``compute(chunk)`` returns the Elementwise of the flat slice ``chunk``.
    """
    acc = Accumulator(param.device, finite_only)
    flat_param = param.detach().reshape(-1)
    for chunk in chunks(param):
        el = compute(chunk)
        theta = flat_param[chunk]
        eta = el.eta if isinstance(el.eta, torch.Tensor) else torch.tensor(
            float(el.eta), dtype=torch.float64, device=theta.device)
        acc.add(eta, el.eps_dominated, el.update(theta), theta)
    return acc.packed()


def realized(param: torch.Tensor, before: torch.Tensor, finite_only: bool = False) -> torch.Tensor:
    """Packed statistics of |delta theta| (empirical mode)."""
    acc = Accumulator(param.device, finite_only)
    after = param.detach().reshape(-1)
    before = before.reshape(-1)
    for chunk in chunks(param):
        delta = after[chunk] - before[chunk]
        acc.add(delta.abs(), None, delta, after[chunk])
    return acc.packed()


def _decode(row: Any) -> tuple[Distribution, float, float]:
    counts, scalars = row[: mapping.FLOAT32_BUCKETS], dict(zip(_SCALARS, row[mapping.FLOAT32_BUCKETS:]))
    sketch = LogSketch.from_float32_buckets(
        counts.astype("int64"), min=scalars["min"], max=scalars["max"], sum=scalars["sum"],
        sum_squares=scalars["sum_squares"],
    )
    eps = int(scalars["eps_dominated"]) if scalars["has_eps"] else None
    return Distribution(sketch, eps), math.sqrt(scalars["update_sq"]), math.sqrt(scalars["param_sq"])


def to_host(stats: dict[str, Any]) -> dict[str, tuple[Distribution, float, float]]:
    """Decode packed vectors: already-decoded (CPU) ones pass through; device ones move to
    the host in one transfer per device."""
    out = {name: value for name, value in stats.items() if isinstance(value, tuple)}
    by_device: dict[torch.device, list[str]] = {}
    for name, packed in stats.items():
        if not isinstance(packed, tuple):
            by_device.setdefault(packed.device, []).append(name)
    for names in by_device.values():
        rows = torch.stack([stats[n] for n in names]).cpu().numpy()
        out.update((name, _decode(row)) for name, row in zip(names, rows))
    return {name: out[name] for name in stats}


def _measured(fn: Callable[[bool], torch.Tensor], finite_only: bool) -> Any:
    """A packed vector, decoded at once when it lives on the CPU: nothing to transfer, and
    the model's tensors then never hold their 256 KiB of bucket counts all at the same time."""
    packed = fn(finite_only)
    return _decode(packed.numpy()) if packed.device.type == "cpu" else packed


def collect(measure: dict[str, Callable[[bool], torch.Tensor]]) -> dict[str, tuple[Distribution, float, float]]:
    """Run every ``measure(finite_only)`` on the fast path, move the results in one transfer,
    and redo (with ``finite_only=True``) only the tensors that turned out to hold NaN/Inf."""
    out = to_host({name: _measured(fn, False) for name, fn in measure.items()})
    redo = {name for name, (dist, _, _) in out.items() if dist.nonfinite and not math.isfinite(dist.sketch.sum)}
    if redo:
        out.update(to_host({name: _measured(measure[name], True) for name in redo}))
    return out
