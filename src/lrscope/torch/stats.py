"""Distribution statistics of torch tensors, computed where the tensors live.

One pass per chunk: float32 bit buckets (``mapping``) counted on the device with
``index_add_`` into ``LANES`` copies (on the CPU by ``stats.bit_histogram``),
exact min/max/sum/sum of squares, the eps-dominated count and the update and
parameter squared norms.  Everything stays on the device until ``to_host`` moves all
tensors of a step in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lrscope.formulas import Elementwise
from lrscope.report import Distribution, decode_statistics, mark_eps_absent, needs_masked_redo
from lrscope.stats import mapping
from lrscope.stats.bit_histogram import BucketCounts

#: Elements processed at once: bounds the temporary memory to a few buffers this size
#: (1 MiB each in float32), whatever the model size; measured fastest on 2 CPU cores
#: (benchmarks/overhead.py): larger chunks fall out of cache.
CHUNK_ELEMENTS = 1 << 18
#: Chunks on a GPU: each operation is a kernel launch per chunk, so small chunks are bound
#: by the launches (49.8M parameters on an H100: 109 ms with chunks of 2**18, 61 ms with
#: 2**22 or 2**24); the temporary memory is a few buffers of 16 MiB in float32.
DEVICE_CHUNK_ELEMENTS = 1 << 22
#: CPU chunks up to this size are reduced in numpy (see ``Accumulator``).
NUMPY_ELEMENTS = 1 << 14
_MASK = mapping.FLOAT32_BUCKETS - 1
#: Copies of the bucket counts on a device for a tensor of at least LANES_MIN_ELEMENTS,
#: summed once per tensor: a tensor's values fall in a few buckets, and a GPU's atomic adds
#: to one address serialise (4M values of eta on an H100: 0.86 ms into one copy, 0.21 ms
#: into 32).  A smaller tensor keeps one copy (256 KiB), not 32 to clear and sum (8 MiB).
LANES = 32
LANES_MIN_ELEMENTS = 1 << 20
_LANE_OFFSETS: dict[torch.device, torch.Tensor] = {}
#: ``segment_results`` reduces in pieces of at most this many elements, then each segment's
#: pieces: a segmented reduction gives each segment one thread block, so a batch of a few
#: segments of a million elements would leave most of a GPU idle.
PIECE_ELEMENTS = 1 << 15


def on_host(device: torch.device) -> bool:
    """Whether values on ``device`` are read without a device-to-host transfer (the CPU:
    there the statistics are decoded at once).  Tests patch it to run the device paths."""
    return device.type == "cpu"


def _add_bucket_counts(counts: torch.Tensor, values: torch.Tensor, weight: int,
                       offsets: torch.Tensor | None = None) -> None:
    """Add ``weight`` per value of ``values`` to its float32 bit bucket (``mapping``) in
    ``counts``, which holds several copies of the buckets when ``offsets`` (one per value)
    say which copy each value goes to.  (Not ``torch.bincount``: on CUDA it reads the keys'
    min and max on the host to size its output, two synchronisations per call.)"""
    bits = values.to(torch.float32).reshape(-1).view(torch.int32)
    keys = (bits >> mapping.FLOAT32_SHIFT) & _MASK
    if offsets is not None:
        keys = keys + offsets
    counts.index_add_(0, keys, counts.new_full((), weight).expand(keys.shape))


def _lane_offsets(device: torch.device, n: int) -> torch.Tensor:
    """(i % LANES) * FLOAT32_BUCKETS for i < n, kept per device (16 MiB on a GPU)."""
    offsets = _LANE_OFFSETS.get(device)
    if offsets is None or offsets.numel() < n:
        offsets = torch.arange(max(n, DEVICE_CHUNK_ELEMENTS), dtype=torch.int32, device=device)
        offsets = offsets.remainder_(LANES).mul_(mapping.FLOAT32_BUCKETS)
        _LANE_OFFSETS[device] = offsets
    return offsets[:n]


def _extremes(values: torch.Tensor, finite_only: bool) -> list[torch.Tensor]:
    """min, max, sum and sum of squares, without a host sync.

    The fast path reduces everything; a NaN/Inf then shows in the sum, and the caller
    redoes that tensor with ``finite_only`` (masking costs three more passes).
    """
    flat = values.reshape(-1)
    if not flat.numel():  # an empty tensor: min and max of nothing (aminmax refuses it)
        inf = flat.new_full((), math.inf)
        return [inf, -inf, flat.new_zeros(()), flat.new_zeros(())]
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


def eta_tensor(el: Elementwise, device: torch.device | None = None) -> torch.Tensor:
    """``el.eta`` as a tensor: a scalar eta (SGD's lr) becomes a 0-d float64 one."""
    return el.eta if isinstance(el.eta, torch.Tensor) else torch.tensor(
        float(el.eta), dtype=torch.float64, device=device)


def _totals(rows: list[torch.Tensor]) -> torch.Tensor:
    """One row from the per-chunk rows (min, max, sum, sum of squares, eps-dominated count,
    update and parameter squared norms), in float64."""
    if len(rows) == 1:  # a tensor of one chunk (most, on a GPU): nothing to combine
        return rows[0].double()
    table = torch.stack([r.double() for r in rows]) if len({r.dtype for r in rows}) > 1 \
        else torch.stack(rows).double()
    return torch.cat([table[:, 0].amin().reshape(1), table[:, 1].amax().reshape(1), table[:, 2:].sum(0)])


def float64_numpy(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as float64 numpy (a copy: small arrays only)."""
    return values.detach().reshape(-1).to(torch.float64).numpy()


def numpy_rows(values: torch.Tensor, eps_dominated: Any, update: torch.Tensor | None,
               param: torch.Tensor, starts: np.ndarray, finite_only: bool = False) -> np.ndarray:
    """``_totals``'s row (min, max, sum, sum of squares, eps-dominated count, update and
    parameter squared norms) of each consecutive segment of small CPU tensors, the
    segments starting at ``starts``, in numpy: a numpy reduction of a few thousand values
    costs a microsecond, a torch one several.  ``finite_only`` leaves NaN/Inf out of the
    extremes and sums (a segment without finite values: min inf, max -inf, sums 0); the
    eps-dominated count is 0 where the family has none.  (No ``@``: numpy's BLAS threads
    would then spin beside PyTorch's and slow down both.)

    >>> rows = numpy_rows(torch.tensor([1.0, 3.0, float("nan")]), None, None,
    ...                   torch.ones(3), np.array([0, 2]), finite_only=True)
    >>> rows.tolist()
    [[1.0, 3.0, 4.0, 10.0, 0.0, 0.0, 2.0], [inf, -inf, 0.0, 0.0, 0.0, 0.0, 1.0]]
    """
    v = float64_numpy(values)
    if not v.size:  # an empty tensor
        return np.array([[math.inf, -math.inf, 0.0, 0.0, 0.0, 0.0, 0.0]])
    low = high = kept = v
    if finite_only:
        finite = np.isfinite(v)
        low, high, kept = (np.where(finite, v, fill) for fill in (math.inf, -math.inf, 0.0))

    def sums(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, starts)

    eps = 0 if eps_dominated is None else sums(torch.as_tensor(eps_dominated).reshape(-1).numpy().astype(np.int64))
    u = 0 if update is None else sums(np.square(float64_numpy(update)))
    theta = float64_numpy(param)
    columns = [np.minimum.reduceat(low, starts), np.maximum.reduceat(high, starts), sums(kept),
               sums(np.square(kept)), eps, u, sums(np.square(theta))]
    return np.stack(np.broadcast_arrays(*columns), 1)


class Accumulator:
    """Statistics of one tensor over its chunks, kept on the device until ``result``.

    Each chunk appends one row (see ``_totals``): on a device in the data's own dtype
    (converting per chunk would cost more small kernels than the statistics themselves),
    on the CPU as float64 numpy.  On the CPU the histogram is counted in one pass over the
    bits (``bit_histogram``), and chunks of at most ``NUMPY_ELEMENTS`` (biases,
    norms) are reduced in numpy.
    """

    def __init__(self, device: torch.device, finite_only: bool = False, elements: int = 0):
        self.device = device
        self.finite_only = finite_only
        self.cpu_counts = BucketCounts() if on_host(device) else None
        self.lanes = LANES if elements >= LANES_MIN_ELEMENTS else 1
        self.counts = None if self.cpu_counts else torch.zeros(
            self.lanes * mapping.FLOAT32_BUCKETS, dtype=torch.int64, device=device)
        self.rows: list[Any] = []  # torch tensors on a device, numpy arrays on the CPU
        self.has_eps = False

    def _count(self, values: torch.Tensor, n: int) -> None:
        weight = n if values.dim() == 0 else 1  # a 0-d value stands for all n elements
        if self.cpu_counts is not None:
            self.cpu_counts.add(values.to(torch.float32).numpy(), weight)
        else:
            lanes = _lane_offsets(self.device, values.numel()) if self.lanes > 1 else None
            _add_bucket_counts(self.counts, values, weight, lanes)

    def add(self, values: torch.Tensor, eps_dominated: Any, update: torch.Tensor | None,
            param: torch.Tensor) -> None:
        values = values.detach()
        n = param.numel()
        self._count(values, n)
        self.has_eps = self.has_eps or eps_dominated is not None
        if self.cpu_counts is not None and n <= NUMPY_ELEMENTS and values.dim():
            self.rows.append(numpy_rows(values, eps_dominated, update, param, np.zeros(1, np.int64),
                                        self.finite_only)[0])
            return
        if values.dim() == 0:  # one eta for the whole chunk (SGD): no per-element work
            extremes = [values, values, values * n, values * values * n]
        else:
            extremes = _extremes(values, self.finite_only)
        eps = param.new_zeros(()) if eps_dominated is None else \
            torch.as_tensor(eps_dominated, device=self.device).sum()
        row = extremes + [eps, _squared_norm(update, param), _squared_norm(param, param)]
        dtype = row[0].dtype
        for r in row[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        self._keep(torch.stack([r if r.dtype == dtype else r.to(dtype) for r in row]))

    def _keep(self, row: torch.Tensor) -> None:
        self.rows.append(row.double().numpy() if self.cpu_counts is not None else row)

    def add_chunk(self, compute: Callable[[slice], Elementwise], flat_param: torch.Tensor,
                  chunk: slice) -> None:
        """The statistics of eta over the flat slice ``chunk`` (``compute(chunk)``)."""
        el = compute(chunk)
        theta = flat_param[chunk]
        self.add(eta_tensor(el, theta.device), el.eps_dominated, el.update(theta), theta)

    def result(self) -> torch.Tensor | tuple[Distribution, float | None, float]:
        """Decoded at once on the CPU (nothing to transfer, and no tensor's bucket counts
        outlive it); on a device, bucket counts then ``report.STATISTICS`` as one float64
        vector for ``to_host`` to move with the others."""
        if self.cpu_counts is None:
            totals = _totals(self.rows)
            if not self.has_eps:
                mark_eps_absent(totals)
            return torch.cat([self.counts.view(self.lanes, -1).sum(0).double(), totals])
        table = np.stack(self.rows)
        totals = np.array([table[:, 0].min(), table[:, 1].max(), *table[:, 2:].sum(axis=0)])
        if not self.has_eps:
            mark_eps_absent(totals)
        # Positive finite extremes of the fast pass bound every counted value (a NaN would
        # show in them; the masked pass leaves NaN/Inf out of them but not of the counts).
        bounded = not self.finite_only and 0 < totals[0] and totals[1] < math.inf
        indices, counts = self.cpu_counts.nonzero((totals[0], totals[1]) if bounded else None)
        return decode_statistics(counts, totals, indices)


def segment_results(values: torch.Tensor, eps_dominated: torch.Tensor | None, update: torch.Tensor | None,
                    param: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``Accumulator.result`` on a device (bucket counts, then ``report.STATISTICS``) of each
    consecutive segment of several tensors laid end to end (``values``: their eta, one per
    element like the others; the segments of the given ``sizes``), one row each, in a fixed
    number of kernels whatever the number of segments: a GPU's time goes to launching
    kernels, some 35 per tensor measured alone.  Segmented reductions, not atomic ones into one value per segment
    (those serialise: 4M values took 290 ms on an H100), over pieces of at most
    ``PIECE_ELEMENTS`` and then over each segment's pieces; the sums in float64."""
    device, k = values.device, len(sizes)
    flat = values.reshape(-1)
    pieces = [-(-size // PIECE_ELEMENTS) for size in sizes]
    piece_sizes = [min(PIECE_ELEMENTS, size - start) for size in sizes for start in range(0, size, PIECE_ELEMENTS)]
    lengths, per_segment, per_piece = _on_device(sizes + pieces + piece_sizes, device).split(
        [k, k, len(piece_sizes)])

    def reduced(x: Any, how: str) -> torch.Tensor:
        """Per segment; None (absent): zeros.  (``unsafe``: no check that reads the lengths
        on the host.)"""
        if x is None:
            return torch.zeros(k, dtype=torch.float64, device=device)
        x = x.reshape(-1).double() if how == "sum" else x.reshape(-1)
        within = torch.segment_reduce(x, how, lengths=per_piece, unsafe=True)
        return torch.segment_reduce(within, how, lengths=per_segment, unsafe=True).double()

    exact = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # (half: exact in float32)
    wide = exact.double()
    totals = torch.stack([
        reduced(exact, "min"), reduced(exact, "max"), reduced(wide, "sum"), reduced(wide * wide, "sum"),
        reduced(eps_dominated, "sum"), reduced(None if update is None else update.double().square(), "sum"),
        reduced(param.double().square(), "sum")], 1)
    if eps_dominated is None:
        mark_eps_absent(totals)
    # int32 segment offsets (k * FLOAT32_BUCKETS < 2**31); output_size: no synchronisation.
    segment = torch.repeat_interleave(torch.arange(k, dtype=torch.int32, device=device), lengths,
                                      output_size=flat.numel())
    counts = torch.zeros(k * mapping.FLOAT32_BUCKETS, dtype=torch.int64, device=device)
    _add_bucket_counts(counts, flat, 1, segment * mapping.FLOAT32_BUCKETS)
    return torch.cat([counts.view(k, -1).double(), totals], 1)


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A few host integers as an int64 tensor on ``device``, copied without synchronising
    (through page-locked memory on CUDA)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def chunks(param: torch.Tensor) -> list[slice]:
    """Flat slices covering ``param``, of at most CHUNK_ELEMENTS (DEVICE_CHUNK_ELEMENTS
    on a device)."""
    n = param.numel()
    size = CHUNK_ELEMENTS if on_host(param.device) else DEVICE_CHUNK_ELEMENTS
    return [slice(i, min(i + size, n)) for i in range(0, max(n, 1), size)]


def reduce(compute: Callable[[slice], Elementwise], param: torch.Tensor, finite_only: bool = False) -> Any:
    """Statistics (``Accumulator.result``) of eta over ``param``, chunk by chunk.

    ``compute(chunk)`` returns the Elementwise of the flat slice ``chunk``.
    """
    acc = Accumulator(param.device, finite_only, param.numel())
    flat_param = param.detach().reshape(-1)
    for chunk in chunks(param):
        acc.add_chunk(compute, flat_param, chunk)
    return acc.result()


def realized(param: torch.Tensor, before: torch.Tensor, finite_only: bool = False) -> Any:
    """Statistics (``Accumulator.result``) of |delta theta| (empirical mode)."""
    acc = Accumulator(param.device, finite_only, param.numel())
    after = param.detach().reshape(-1)
    before = before.reshape(-1)
    for chunk in chunks(param):
        delta = after[chunk] - before[chunk]
        acc.add(delta.abs(), None, delta, after[chunk])
    return acc.result()


def _host_copy(values: torch.Tensor) -> np.ndarray:
    """A device tensor's values in host memory, in one synchronising transfer.  From CUDA
    through page-locked memory: a copy to ordinary (pageable) memory moved the benchmark
    model's 21 MB of bucket counts at 1.2 GB/s on an H100 machine (17.6 ms)."""
    if values.device.type != "cuda":
        return values.cpu().numpy()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    torch.cuda.current_stream(values.device).synchronize()
    return host.numpy()


def to_host(stats: dict[str, Any], counters: dict[Any, Any] | None = None
            ) -> tuple[dict[str, tuple[Distribution, float | None, float]], dict[Any, int]]:
    """Decode packed vectors: already-decoded (CPU) ones pass through; device ones move to
    the host in one transfer per device, together with the ``counters`` (step counters,
    numbers or one-element tensors) that live on that device.  Returns the decoded
    statistics and the counters as ints."""
    out = {name: value for name, value in stats.items() if isinstance(value, tuple)}
    steps: dict[Any, int] = {}
    by_device: dict[torch.device, list[tuple[bool, Any, torch.Tensor]]] = {}
    for name, packed in stats.items():
        if not isinstance(packed, tuple):
            by_device.setdefault(packed.device, []).append((False, name, packed))
    for name, counter in (counters or {}).items():
        if isinstance(counter, torch.Tensor) and not on_host(counter.device):
            by_device.setdefault(counter.device, []).append((True, name, counter))
        else:
            steps[name] = int(float(counter))
    for entries in by_device.values():
        flat = _host_copy(torch.cat([value.reshape(-1).double() for _, _, value in entries]))
        offset = 0
        for is_counter, name, value in entries:
            row, offset = flat[offset:offset + value.numel()], offset + value.numel()
            if is_counter:
                steps[name] = int(row[0])
            else:
                out[name] = decode_statistics(row[:mapping.FLOAT32_BUCKETS].astype(np.int64),
                                              row[mapping.FLOAT32_BUCKETS:])
    return {name: out[name] for name in stats}, steps


@dataclass
class Pending:
    """Statistics computed by ``tasks`` on worker threads (``torch_fused``), then ``combine``
    of their results.  ``collect`` starts them only once every other measurement of the step
    is done (PyTorch's own parallel kernels slow down many times while the workers keep its
    threads' cores busy), and combines them only once every task is done.  Python on the
    calling thread beside the workers slows them by more than it costs (49.8M parameters on
    2 cores: combining each tensor as its parts came, or on the worker that finished its
    last part, 22-26 ms instead of 19-20 ms, then 2.7 ms to combine; preparing the tensors'
    tasks one by one as the workers ran, 1.1 ms saved and 1.8 ms lost).  ``run`` runs a
    list of tasks and returns their results in order: the tasks of every tensor of a step
    that share it go to it in one call (``collect``)."""

    tasks: list[Callable[[], Any]]
    combine: Callable[[list[Any]], Any]
    run: Callable[[list[Callable[[], Any]]], list[Any]]
    results: list[Any] | None = None

    def result(self) -> Any:
        return self.combine(self.results)


def _run_pending(pending: list[Pending]) -> None:
    """Every task of ``pending``, one ``run`` call per runner, each result kept by its Pending."""
    runners = {id(value.run): value.run for value in pending}
    for key, run in runners.items():
        mine = [value for value in pending if id(value.run) == key]
        results = iter(run([task for value in mine for task in value.tasks]))
        for value in mine:
            value.results = [next(results) for _ in value.tasks]


def collect(measure: dict[str, Callable[[bool], Any]], counters: dict[Any, Any] | None = None
            ) -> tuple[dict[str, tuple[Distribution, float | None, float]], dict[Any, int]]:
    """Run every ``measure(finite_only)`` (an ``Accumulator.result``, or a ``Pending`` one,
    run once the others are done) on the fast path, move the device results and
    ``counters`` (see ``to_host``) in one transfer per device, and redo (with
    ``finite_only=True``) only the tensors that turned out to hold NaN/Inf."""
    measured = {name: fn(False) for name, fn in measure.items()}
    _run_pending([value for value in measured.values() if isinstance(value, Pending)])
    out, steps = to_host({name: value.result() if isinstance(value, Pending) else value
                          for name, value in measured.items()}, counters)
    redo = {name for name, (dist, _, _) in out.items() if needs_masked_redo(dist)}
    if redo:
        out.update(to_host({name: measure[name](True) for name in redo})[0])
    return out, steps


class SharedMeasurement:
    """Tensors measured together once, on the first request for any of them (``_compute``);
    a tensor holding NaN/Inf is redone on its own, masked (``_compute_one``)."""

    def __init__(self, items: dict[str, tuple[Any, ...]]):
        self.items = items
        self.results: dict[str, Any] | None = None

    def measures(self) -> dict[str, Callable[[bool], Any]]:
        return {name: (lambda finite_only, name=name: self.measure(name, finite_only)) for name in self.items}

    def measure(self, name: str, finite_only: bool) -> Any:
        if finite_only:  # the rare redo of a tensor holding NaN/Inf
            return self._compute_one(name)
        if self.results is None:
            self.results = self._compute()
        return self.results[name]

    def _compute(self) -> dict[str, Any]:
        raise NotImplementedError

    def _compute_one(self, name: str) -> Any:
        raise NotImplementedError
