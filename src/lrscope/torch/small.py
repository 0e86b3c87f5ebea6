"""Statistics of many tensors from one formula call: small CPU tensors (biases, norm
weights), and on a device (a GPU) every tensor of up to ``DEVICE_BATCH_ELEMENTS``.

Each small tensor on its own costs a dozen eager torch calls of a few microseconds, far
more than its arithmetic: on a small model lrscope would cost several optimizer steps; on
a GPU each tensor measured alone costs some 35 kernel launches, which take longer than the
kernels.  Here the state of every such tensor that shares a formula (same family, options,
dtype, device and per-step scalars) is concatenated, the family's formula (``formulas/``)
runs once over the concatenation, and each tensor's segment is reduced: in numpy on the
CPU, on the device by a fixed number of kernels per batch (``stats.segment_results``).
The same elementwise arithmetic as tensor by tensor, so the same eta, and per-tensor
results in the format of ``stats.Accumulator.result``.  Temporary memory is bounded
by ``BATCH_ELEMENTS`` (``DEVICE_BATCH_ELEMENTS`` on a device).

A tensor whose statistics hold NaN/Inf is redone on its own (``stats.collect``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from lrscope.torch import fused, stats, triton_kernel
from lrscope.report import decode_statistics, mark_eps_absent
from lrscope.stats import mapping

#: CPU tensors of at most this many elements are batched: all those too small for the
#: compiled kernel (``fused.FUSED_MIN_ELEMENTS``), so that none is measured alone, eagerly.
SMALL_ELEMENTS = fused.FUSED_MIN_ELEMENTS - 1
#: On a device (a GPU), tensors of at most this many elements are batched, in batches of up
#: to this many, and reduced per tensor on the device (``stats.segment_results``): the
#: launches, not the arithmetic, take a GPU's time.
DEVICE_BATCH_ELEMENTS = stats.DEVICE_CHUNK_ELEMENTS
#: Elements per batch: the concatenated state and its float64 copies (a few buffers of
#: this size, about 1 MiB in all) stay in cache.  Measured on 2 cores, 82-tensor 0.5M
#: model: 65,536 about 6 ms per measurement, 262,144 about 11 ms, 16,384 about 8.5 ms.
BATCH_ELEMENTS = stats.CHUNK_ELEMENTS // 4


def _signature(formula: fused.ChunkedFormula) -> tuple[Any, ...] | None:
    """What must be equal for two tensors to share one formula call; None if a per-step
    value (t among them) is neither a number nor a 0-d CPU tensor, such as the step
    counter of a capturable optimizer, which lives on the GPU and would have to be read
    there (then the tensor is measured alone)."""
    flat, rest = formula.parts
    scalars = []
    for key, value in sorted({**rest, "t": formula.t}.items()):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
            value = (value.dtype, value.item())
        elif not isinstance(value, (int, float)):  # (reading a device scalar would synchronise)
            return None
        scalars.append((key, value))
    # (The hyperparameters: one dict per parameter group, shared by its tensors.)
    return (formula.family, formula.dtype, flat["param"].device, tuple(sorted(flat)), tuple(scalars),
            id(formula.h))


def _batchable(compute: Any, param: torch.Tensor) -> bool:
    """A small tensor whose formula shares a call; on the CPU, not one the compiled kernel
    measures (once a large tensor has compiled it, the kernel measures the small ones too:
    one pass each, where a batch takes a dozen)."""
    on_host = stats.on_host(param.device)
    limit = SMALL_ELEMENTS if on_host else DEVICE_BATCH_ELEMENTS
    return (isinstance(compute, fused.ChunkedFormula) and 1 < param.numel() <= limit
            and not (on_host and fused.applies(compute, param, False)))


def measures(items: dict[str, tuple[Callable[[slice], Any], torch.Tensor]]) -> dict[str, Callable[[bool], Any]]:
    """``{name: measure(finite_only)}`` for ``stats.collect`` from ``{name: (compute,
    param)}``: GPU tensors by ``triton_kernel`` where it takes them; small CPU tensors that
    share a formula together, the others by ``fused.reduce``."""
    out = triton_kernel.measures(items)  # GPU tensors, one Triton kernel per group
    batches: dict[tuple[Any, ...], list[str]] = {}
    for name, (compute, param) in items.items():
        if name in out:
            continue
        signature = _signature(compute) if _batchable(compute, param) else None
        if signature is None:
            out[name] = lambda finite_only, c=compute, p=param: fused.reduce(c, p, finite_only)
        else:
            batches.setdefault(signature, []).append(name)
    for names in batches.values():
        limit = BATCH_ELEMENTS if stats.on_host(items[names[0]][1].device) else DEVICE_BATCH_ELEMENTS
        for run in _runs(names, lambda name: items[name][1].numel(), limit):
            out.update(_Batch({name: items[name] for name in run}).measures())
    return {name: out[name] for name in items}


def _runs(names: list[str], size: Callable[[str], int], limit: int) -> Iterator[list[str]]:
    """``names`` in consecutive runs of at most ``limit`` elements each (or of one name)."""
    run: list[str] = []
    total = 0
    for name in names:
        if run and total + size(name) > limit:
            yield run
            run, total = [], 0
        run.append(name)
        total += size(name)
    if run:
        yield run


class _Batch(stats.SharedMeasurement):
    """Small tensors sharing one formula call."""

    items: dict[str, tuple[fused.ChunkedFormula, torch.Tensor]]

    def _compute_one(self, name: str) -> Any:
        return fused.reduce(*self.items[name], finite_only=True)

    def _compute(self) -> dict[str, Any]:
        formulas = [formula for formula, _ in self.items.values()]
        first = formulas[0]
        flat = {key: torch.cat([f.parts[0][key] for f in formulas]) for key in first.parts[0]}
        theta = flat["param"]
        el = first.apply(first.family, {**first.parts[1], **flat}, first.t, first.h, first.dtype)
        eta = stats.eta_tensor(el, theta.device).detach()
        eta = eta.expand(theta.shape) if eta.dim() == 0 else eta
        sizes = np.array([param.numel() for _, param in self.items.values()])
        if not stats.on_host(theta.device):  # packed rows, moved later with the others
            rows = stats.segment_results(eta, el.eps_dominated, el.update(theta), theta, sizes.tolist())
            return dict(zip(self.items, rows))
        rows = stats.numpy_rows(eta, el.eps_dominated, el.update(theta), theta, segment_starts(sizes))
        if el.eps_dominated is None:
            mark_eps_absent(rows)
        buckets = (eta.to(torch.float32).numpy().view(np.uint32) >> mapping.FLOAT32_SHIFT).astype(np.int64)
        return {name: decode_statistics(counts, rows[i], indices)
                for i, (name, (indices, counts)) in enumerate(zip(self.items, segment_counts(buckets, sizes)))}


def segment_starts(sizes: np.ndarray) -> np.ndarray:
    """Where each of consecutive segments of the given ``sizes`` starts.

    >>> segment_starts(np.array([3, 2, 4])).tolist()
    [0, 3, 5]
    """
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def segment_counts(keys: np.ndarray, sizes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The distinct keys (sorted) and their counts in each consecutive segment of ``keys``
    (non-negative int64) of the given ``sizes``.

    One ``bincount`` over the segments' key ranges laid end to end, no sort; a sort instead
    where those ranges are wide (NaN beside finite values, mixed signs), so that memory stays
    within a few times the number of keys.

    >>> segment_counts(np.array([5, 3, 5, 7, 7]), np.array([3, 2]))
    [(array([3, 5]), array([1, 2])), (array([7]), array([2]))]
    """
    starts = segment_starts(sizes)
    low, high = np.minimum.reduceat(keys, starts), np.maximum.reduceat(keys, starts)
    offsets = np.concatenate([[0], np.cumsum(high - low + 1)])
    if offsets[-1] <= 8 * keys.size + mapping.FLOAT32_BUCKETS:
        counts = np.bincount(keys + np.repeat(offsets[:-1] - low, sizes), minlength=offsets[-1])
        out = []
        for i in range(sizes.size):
            mine = counts[offsets[i]:offsets[i + 1]]
            nonzero = np.flatnonzero(mine)
            out.append((nonzero + low[i], mine[nonzero]))
        return out
    segment = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    pairs, counts = np.unique((segment << 32) | keys, return_counts=True)
    bounds = np.searchsorted(pairs >> 32, np.arange(sizes.size + 1))
    return [(pairs[bounds[i]:bounds[i + 1]] & 0xFFFFFFFF, counts[bounds[i]:bounds[i + 1]])
            for i in range(sizes.size)]
