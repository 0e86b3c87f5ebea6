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
#: (about 4 MiB each in float32), whatever the model size.
CHUNK_ELEMENTS = 1 << 20
_MASK = mapping.FLOAT32_BUCKETS - 1
# Layout of the per-tensor statistics vector: bucket counts, then these scalars.
_SCALARS = ("min", "max", "sum", "sum_squares", "eps_dominated", "update_sq", "param_sq", "has_eps")


def _buckets(values: torch.Tensor) -> torch.Tensor:
    bits = values.to(torch.float32).reshape(-1).view(torch.int32)
    return torch.bincount((bits >> mapping.FLOAT32_SHIFT) & _MASK, minlength=mapping.FLOAT32_BUCKETS)


def _finite_extremes(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """min, max, sum and sum of squares of the finite values, without a host sync."""
    inf = math.inf
    low = values.nan_to_num(nan=inf, posinf=inf, neginf=inf).amin()
    high = values.nan_to_num(nan=-inf, posinf=-inf, neginf=-inf).amax()
    finite = values.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).reshape(-1).double()
    return low, high, finite.sum(), torch.dot(finite, finite)


class Accumulator:
    """Running statistics of one tensor over its chunks (device tensors)."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(mapping.FLOAT32_BUCKETS, dtype=torch.int64, device=device)
        self.scalars = torch.tensor([math.inf, -math.inf] + [0.0] * 6, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, eps_dominated: Any, update: torch.Tensor | None,
            param: torch.Tensor) -> None:
        values = values.detach()
        self.counts += _buckets(values)
        low, high, total, squares = _finite_extremes(values)
        s = self.scalars
        s[0] = torch.minimum(s[0], low.double())
        s[1] = torch.maximum(s[1], high.double())
        s[2] += total
        s[3] += squares
        if eps_dominated is not None:
            s[4] += torch.as_tensor(eps_dominated).sum()
            s[7] = 1.0
        if update is not None:
            flat = update.reshape(-1).double()
            s[5] += torch.dot(flat, flat)
        flat_param = param.reshape(-1).double()
        s[6] += torch.dot(flat_param, flat_param)

    def packed(self) -> torch.Tensor:
        return torch.cat([self.counts.double(), self.scalars])


def chunks(param: torch.Tensor) -> list[slice]:
    n = param.numel()
    return [slice(start, min(start + CHUNK_ELEMENTS, n)) for start in range(0, max(n, 1), CHUNK_ELEMENTS)]


def reduce(compute: Callable[[slice], Elementwise], param: torch.Tensor) -> torch.Tensor:
    """Packed statistics of eta over ``param``, chunk by chunk.

    ``compute(chunk)`` returns the Elementwise of the flat slice ``chunk``.
    """
    acc = Accumulator(param.device)
    flat_param = param.detach().reshape(-1)
    for chunk in chunks(param):
        el = compute(chunk)
        theta = flat_param[chunk]
        eta = el.eta if isinstance(el.eta, torch.Tensor) else torch.tensor(
            float(el.eta), dtype=torch.float64, device=theta.device)
        eta = eta.expand(theta.shape) if eta.dim() == 0 else eta
        acc.add(eta, el.eps_dominated, el.update(theta), theta)
    return acc.packed()


def realized(param: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Packed statistics of |delta theta| (empirical mode)."""
    acc = Accumulator(param.device)
    after = param.detach().reshape(-1)
    before = before.reshape(-1)
    for chunk in chunks(param):
        delta = after[chunk] - before[chunk]
        acc.add(delta.abs(), None, delta, after[chunk])
    return acc.packed()


def to_host(stats: dict[str, torch.Tensor]) -> dict[str, tuple[Distribution, float, float]]:
    """Move every packed vector to the host at once and decode it."""
    if not stats:
        return {}
    by_device: dict[torch.device, list[str]] = {}
    for name, packed in stats.items():
        by_device.setdefault(packed.device, []).append(name)
    rows = {}
    for names in by_device.values():  # one transfer per device
        rows.update(zip(names, torch.stack([stats[n] for n in names]).cpu().numpy()))
    out = {}
    for name, row in rows.items():
        counts, scalars = row[: mapping.FLOAT32_BUCKETS], dict(zip(_SCALARS, row[mapping.FLOAT32_BUCKETS:]))
        sketch = LogSketch.from_float32_buckets(
            counts.astype("int64"), min=scalars["min"], max=scalars["max"], sum=scalars["sum"],
            sum_squares=scalars["sum_squares"],
        )
        eps = int(scalars["eps_dominated"]) if scalars["has_eps"] else None
        out[name] = (Distribution(sketch, eps), math.sqrt(scalars["update_sq"]), math.sqrt(scalars["param_sq"]))
    return out
