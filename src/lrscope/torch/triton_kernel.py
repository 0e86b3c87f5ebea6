"""Every statistic of many GPU tensors in one generated Triton kernel.

Eager PyTorch on a GPU spends its time launching kernels: a dozen per chunk and tensor,
some 1,000 per measured step of a 50M-parameter model (``stats``, ``small``).  Here the
family's formula (``formulas/``, traced as for the CPU kernel: ``fused.traceable``,
``kernel.trace``) becomes the body of one Triton kernel, and all tensors that share it
(same family, options and dtypes: ``fused._inputs``'s key) are measured by one launch.

How the kernel works: each program takes ``BLOCK`` elements of one tensor (it finds which
from a table of each tensor's first block), loads them through a table of the tensors'
addresses (so nothing is copied or concatenated), computes eta, the update and the
eps-dominated flag operation by operation in the dtypes torch computes them in (IEEE
division and square root, no fused multiply-add, as eager kernels do), and reduces the
block: min/max and the float64 sums go to its tensor's row of ``stats.Accumulator``'s
statistics by atomics; the float32 bit buckets of eta (``stats.mapping``) are counted by
``tl.histogram`` over a window of ``WINDOW`` buckets above the block's smallest key and
merged with one atomic add per nonzero bin, the few values outside the window added one
by one.  Per-step scalars (t, lr, beta powers, on the host or the device) are one float64
row per tensor; the rest of the formula's hyperparameters are constants of the generated
source.  Per launch the host writes one small table (addresses, blocks, scalars) and
copies it without synchronising; the result is each tensor's packed vector (bucket counts,
then ``report.STATISTICS``) for ``stats.to_host``'s one transfer.  Extra memory: that
table and an int32 row of bucket counts per tensor, whatever the tensors' sizes.

Why Triton: it ships with PyPI's CUDA builds of torch and compiles at run time (a CUDA C
extension would need a compiler where lrscope is installed); its interpreter runs the same
kernel on CPU tensors, so CI checks the GPU arithmetic; and unlike ``torch.compile`` of the
eager statistics it does all of them in one pass, histogram included, for tensors of any
shapes without guards or recompilation.  The address table, rather than concatenating the
tensors as ``small`` does, keeps the extra memory fixed.

Used for CUDA tensors of more than one element with float32/float64 state when triton is
installed (``LRSCOPE_FUSED=0`` switches it off with the CPU kernel); a formula the
generator cannot translate (or that fails to compile) warns once and stays eager.  Tested
without a GPU through Triton's interpreter (``TRITON_INTERPRET=1``), tensor by tensor
against the eager path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import linecache
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lrscope._fast import fast_statistics
from lrscope._warnings import warn
from lrscope.report import STATISTICS
from lrscope.stats import mapping
from lrscope.torch import fused, stats
from lrscope.torch.kernel import Unsupported, trace

#: Elements per program.
BLOCK = 2048
#: Buckets counted per program by ``tl.histogram`` (8 binades above the block's smallest
#: eta); values beyond them are added one atomic each.
WINDOW = 512
#: Tensors per launch at most (the kernel searches a table this long, padded to a power of two).
GROUP_TENSORS = 256
#: Device types whose tensors take the kernel (the tests add "cpu", with the interpreter).
DEVICE_TYPES = ("cuda",)
_DTYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64", torch.bool: "tl.int1",
           torch.int64: "tl.int64", torch.int32: "tl.int32"}
_aten = torch.ops.aten
_BINARY = {_aten.add: "+", _aten.sub: "-", _aten.mul: "*", _aten.lt: "<", _aten.le: "<=", _aten.gt: ">",
           _aten.ge: ">=", _aten.eq: "==", _aten.ne: "!=", _aten.logical_and: "&", _aten.logical_or: "|",
           _aten.bitwise_and: "&", _aten.bitwise_or: "|"}
_SAME = {_aten.clone, _aten.alias, _aten.detach, _aten.lift_fresh_copy, _aten._to_copy}
_kernels: dict[tuple[Any, ...], "Compiled | None"] = {}

_TEMPLATE = '''
def kernel(pointers, blocks, sizes, scalars, counts, statistics, tensors,
           TENSORS: tl.constexpr, FINITE_ONLY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, TENSORS)
    firsts = tl.load(blocks + ids, mask=ids < tensors, other=0)
    tensor = tl.sum(((ids < tensors) & (firsts <= pid)).to(tl.int32)) - 1
    offsets = (pid - tl.load(blocks + tensor)) * {block} + tl.arange(0, {block})
    mask = offsets < tl.load(sizes + tensor)
{loads}
{body}
    eta = tl.where(mask, eta, eta)  # (a scalar eta, SGD's lr, broadcast to the block)
    wide = eta.to(tl.float64)
    if FINITE_ONLY:
        kept = mask & (wide == wide) & (tl.abs(wide) != float("inf"))
    else:
        kept = mask
    values = tl.where(kept, wide, 0.0)
    row = statistics + tensor * {statistics}
    tl.atomic_min(row, tl.min(tl.where(kept, wide, float("inf")), axis=0))
    tl.atomic_max(row + 1, tl.max(tl.where(kept, wide, -float("inf")), axis=0))
    tl.atomic_add(row + 2, tl.sum(values, axis=0))
    tl.atomic_add(row + 3, tl.sum(values * values, axis=0))
{eps}
    update = tl.where(mask, update, 0).to(tl.float64)
    tl.atomic_add(row + 5, tl.sum(update * update, axis=0))
    theta = tl.where(mask, theta, 0).to(tl.float64)
    tl.atomic_add(row + 6, tl.sum(theta * theta, axis=0))
    keys = (eta.to(tl.float32).to(tl.int32, bitcast=True) >> {shift}) & {last_bucket}
    first = tl.min(tl.where(mask, keys, {last_bucket}), axis=0)
    window = keys - first
    histogram = tl.histogram(window, {window}, mask=mask & (window < {window}))
    bucket_counts = counts + tensor * {buckets}
    tl.atomic_add(bucket_counts + first + tl.arange(0, {window}), histogram, mask=histogram > 0)
    tl.atomic_add(bucket_counts + keys, 1, mask=mask & (window >= {window}))
'''


def enabled() -> bool:
    """Whether the kernel may run: triton installed, ``LRSCOPE_FUSED`` not 0, not inside
    ``torch.compile``'s tracing."""
    return fast_statistics() and _triton_installed() and not torch.compiler.is_compiling()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def takes(compute: Any, param: torch.Tensor) -> bool:
    """Whether ``param``'s statistics (``compute`` its formula) can take the kernel."""
    return (isinstance(compute, fused.ChunkedFormula) and compute.family not in fused.EAGER_FAMILIES
            and param.device.type in DEVICE_TYPES and 1 < param.numel() < 1 << 31
            and all(v.dtype in (torch.float32, torch.float64) for v in compute.parts[0].values()))


def measures(items: dict[str, tuple[Callable[[slice], Any], torch.Tensor]]) -> dict[str, Callable[[bool], Any]]:
    """``{name: measure(finite_only)}`` for ``stats.collect``, of the tensors of ``items``
    (``{name: (compute, param)}``) that the kernel takes, one launch per group of up to
    ``GROUP_TENSORS`` that share a kernel; the others are left out."""
    groups: dict[tuple[Any, ...], dict[str, tuple[fused.ChunkedFormula, torch.Tensor, dict[str, Any]]]] = {}
    for name, (compute, param) in items.items() if enabled() else ():
        if takes(compute, param):
            kernel, key, scalars = _kernel(compute)
            if kernel is not None:
                groups.setdefault((key, param.device), {})[name] = (compute, param, scalars)
    out: dict[str, Callable[[bool], Any]] = {}
    for (key, _), group in groups.items():
        names = list(group)
        for start in range(0, len(names), GROUP_TENSORS):
            out.update(_Group(key, {name: group[name] for name in names[start:start + GROUP_TENSORS]}).measures())
    return out


class _Group(stats.SharedMeasurement):
    """Tensors sharing one kernel, measured by one launch."""

    def __init__(self, key: tuple[Any, ...],
                 items: dict[str, tuple[fused.ChunkedFormula, torch.Tensor, dict[str, Any]]]):
        super().__init__(items)
        self.key = key

    def _compute(self) -> dict[str, Any]:
        return self._run(self.items, False)

    def _compute_one(self, name: str) -> Any:
        return self._run({name: self.items[name]}, True)[name]

    def _run(self, items: dict[str, tuple[fused.ChunkedFormula, torch.Tensor, dict[str, Any]]],
             finite_only: bool) -> dict[str, Any]:
        kernel = _kernels.get(self.key)
        if kernel is not None:
            try:
                return dict(zip(items, kernel.launch(list(items.values()), finite_only)))
            except Exception as error:  # noqa: BLE001 - a compiler or driver failure: stay correct, go eager
                _kernels[self.key] = None
                warn(f"lrscope: the Triton statistics kernel failed ({type(error).__name__}: {error}); "
                     "computing them eagerly (slower, same results)")
        return {name: fused.reduce(compute, param, finite_only) for name, (compute, param, _) in items.items()}


@dataclass
class Compiled:
    """A generated kernel: ``launch`` measures tensors that share its formula."""

    function: Any  # the triton.JITFunction
    source: str  # of ``function``, for reading
    arrays: list[str]  # the per-element inputs it reads, in table order
    scalars: list[str]  # the per-step scalars, in row order
    has_eps: bool

    def launch(self, items: list[tuple[fused.ChunkedFormula, torch.Tensor, dict[str, Any]]],
               finite_only: bool) -> torch.Tensor:
        """Rows of bucket counts then ``STATISTICS`` (float64), one per tensor of ``items``
        (formula, parameter, per-step scalars)."""
        k = len(items)
        device = items[0][1].device
        inputs = [[formula.parts[0][name].contiguous() for formula, _, _ in items] for name in self.arrays]
        sizes = np.array([param.numel() for _, param, _ in items], np.int64)
        blocks = np.concatenate([[0], np.cumsum(-(-sizes // BLOCK))])
        scalar_values = [scalars for _, _, scalars in items]
        on_device = [(i, j, row[name]) for i, row in enumerate(scalar_values) for j, name in enumerate(self.scalars)
                     if isinstance(row[name], torch.Tensor) and row[name].device.type != "cpu"]
        host = np.concatenate([np.array([[t.data_ptr() for t in tensors] for tensors in inputs], np.int64).reshape(-1),
                               blocks[:-1], sizes,
                               np.array([[_host_float(row[name]) for name in self.scalars] for row in scalar_values],
                                        np.float64).reshape(-1).view(np.int64),
                               np.tile([np.inf, -np.inf, 0, 0, 0 if self.has_eps else -1, 0, 0], k).view(np.int64)])
        table = _on_device(host, device)
        pointers, starts, lengths, scalars, statistics = table.split(
            [len(self.arrays) * k, k, k, len(self.scalars) * k, len(STATISTICS) * k])
        scalars, statistics = scalars.view(torch.float64), statistics.view(torch.float64)
        for i, j, value in on_device:  # (a capturable optimizer's step and lr: copied on the device)
            scalars[i * len(self.scalars) + j].copy_(value)
        counts = torch.zeros(k, mapping.FLOAT32_BUCKETS, dtype=torch.int32, device=device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # (triton's device)
            self.function[(int(blocks[-1]),)](pointers, starts, lengths, scalars, counts, statistics, k,
                                              TENSORS=max(2, 1 << (k - 1).bit_length()), FINITE_ONLY=finite_only,
                                              enable_fp_fusion=False)
        return torch.cat([counts.double(), statistics.view(k, -1)], 1)


def _host_float(value: Any) -> float:
    """A per-step scalar as a float; 0 for a device tensor (copied on the device)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.device.type == "cpu" else 0.0
    return float(value)


def _on_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 host values on ``device``, copied without synchronising (page-locked on CUDA)."""
    host = torch.from_numpy(values)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device, copy=True)


def _kernel(formula: fused.ChunkedFormula) -> tuple[Compiled | None, tuple[Any, ...], dict[str, Any]]:
    """The kernel of ``formula`` (generated on first use of its key), None if it cannot be
    generated (warned once per key); its key and ``formula``'s per-step scalars."""
    scalars, constants, key = fused._inputs(formula)
    cuda = formula.parts[0]["param"].device.type == "cuda"
    kinds = {name: _kind(value) for name, value in scalars.items()}
    key = ("triton", cuda, tuple(kinds.values()), *key)
    if key not in _kernels:
        try:
            traced, arrays, examples = fused.traceable(formula, scalars, constants)
            # (CPU examples of device scalars: a CUDA 0-d tensor does not combine with the
            # CPU examples of the arrays, and copying it here would synchronise)
            examples = {name: value if value.device.type == "cpu" else torch.zeros((), dtype=value.dtype)
                        for name, value in examples.items()}
            _kernels[key] = _generate(traced, arrays, examples, kinds, cuda)
        except Exception as error:  # noqa: BLE001 - any tracing or translation failure: stay eager
            _kernels[key] = None
            warn(f"lrscope: the Triton statistics kernel of {formula.family} failed ({type(error).__name__}: "
                 f"{error}); computing them eagerly (slower, same results)")
    return _kernels[key], key, scalars


def _kind(value: Any) -> str:
    """Where a per-step scalar lives: a Python "number", a "cpu" or a "device" tensor."""
    if not isinstance(value, torch.Tensor):
        return "number"
    return "cpu" if value.device.type == "cpu" else "device"


def _generate(formula: Callable[..., Any], arrays: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor],
              kinds: dict[str, str], cuda: bool) -> Compiled:
    """The Triton kernel of ``formula`` traced with ``arrays`` and ``scalars`` (``kernel.trace``),
    whose scalars are of the ``kinds`` given, for CUDA tensors (or others) as ``cuda`` says."""
    translation = _Translation(trace(formula, arrays, scalars), list(arrays), kinds, cuda)
    eta, update, theta, *eps = translation.outputs
    if eta.meta["val"].dtype not in (torch.float32, torch.float64):
        raise Unsupported(f"eta in {eta.meta['val'].dtype}")
    body = [*translation.body, f"eta = {translation.names[eta]}", f"update = {translation.operand(update)}",
            f"theta = {translation.operand(theta)}"]
    source = _TEMPLATE.format(
        block=BLOCK, statistics=len(STATISTICS), shift=mapping.FLOAT32_SHIFT, window=WINDOW,
        last_bucket=mapping.FLOAT32_BUCKETS - 1, buckets=mapping.FLOAT32_BUCKETS,
        loads="\n".join("    " + line for line in translation.loads),
        body="\n".join("    " + line for line in body),
        eps=(f"    tl.atomic_add(row + 4, tl.sum(tl.where(mask & {translation.operand(eps[0])}, 1.0, 0.0), axis=0))"
             if eps else ""))
    return Compiled(_compile(source), source, translation.arrays, list(scalars), bool(eps))


def _compile(source: str) -> Any:
    """``source``'s ``kernel`` as a triton.jit function (its source kept in ``linecache``,
    where triton reads it)."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    filename = f"<lrscope triton {hashlib.sha1(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"tl": tl, "libdevice": libdevice}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - generated above
    return triton.jit(namespace["kernel"])


class _Translation:
    """Triton source lines of a traced graph: its per-element inputs loaded through the
    address table (``loads``), its per-step scalars from the tensor's row, and one line per
    operation (``body``), in the dtype torch computes it in.

    The tracer sees every scalar as a 0-d tensor, where the eager formula has Python
    numbers: ``number / tensor`` is then ``tensor.reciprocal() * number``, and on CUDA
    ``tensor / scalar`` of a host scalar is ``tensor * (1 / scalar)``.  So each node's
    ``kind`` (elementwise, or a 0-d "number", "cpu" or "device" value) picks the arithmetic
    the eager kernels do."""

    def __init__(self, graph: torch.fx.Graph, arrays: list[str], kinds: dict[str, str], cuda: bool):
        scalars = list(kinds)
        self.cuda = cuda
        self.kind: dict[Any, str] = {}
        self.names: dict[torch.fx.Node, str] = {}
        self.loads: list[str] = []
        self.body: list[str] = []
        self.arrays: list[str] = []  # the per-element inputs the graph uses, in table order
        placeholders = iter([*(("a", name) for name in arrays), *(("s", name) for name in scalars)])
        for index, node in enumerate(graph.nodes):
            name = self.names[node] = f"v{index}"
            if node.op == "placeholder":
                kind, input_name = next(placeholders)
                self.kind[node] = "elementwise" if kind == "a" else kinds[input_name]
                dtype = _DTYPES[node.meta["val"].dtype]
                if kind == "a" and node.users:
                    self.loads.append(f"p{len(self.arrays)} = tl.load(pointers + {len(self.arrays)} * tensors + tensor)"
                                      f".to(tl.pointer_type({dtype}))")
                    self.loads.append(f"{name} = tl.load(p{len(self.arrays)} + offsets, mask=mask, other=1)")
                    self.arrays.append(input_name)
                elif kind == "s":
                    column = scalars.index(input_name)
                    self.loads.append(f"{name} = tl.load(scalars + tensor * {len(scalars)} + {column}).to({dtype})")
            elif node.op == "call_function":
                self.kind[node] = self._kind_of(node)
                self.body.append(f"{name} = ({self._expression(node)}).to({_DTYPES[node.meta['val'].dtype]})")
            elif node.op == "output":
                self.outputs = node.args[0]
            else:
                raise Unsupported(f"{node.op} {node.target} in the formula")

    def _kind_of(self, node: torch.fx.Node) -> str:
        """elementwise if any input is, else the 0-d kind: device before cpu before number."""
        kinds = {self.kind[a] for a in node.args if isinstance(a, torch.fx.Node)}
        return next((k for k in ("elementwise", "device", "cpu") if k in kinds), "number")

    def operand(self, arg: Any, dtype: torch.dtype | None = None) -> str:
        """``arg`` (a node or a Python number) as ``dtype`` (a node: its own by default)."""
        if isinstance(arg, torch.fx.Node):
            own = arg.meta["val"].dtype
            return self.names[arg] if dtype in (None, own) else f"{self.names[arg]}.to({_DTYPES[dtype]})"
        if dtype is None or dtype == torch.bool or isinstance(arg, bool):
            return repr(bool(arg)) if isinstance(arg, bool) or dtype == torch.bool else repr(arg)
        value = float(arg) if dtype.is_floating_point else int(arg)
        return f"tl.full([], {value!r}, {_DTYPES[dtype]})"

    def _expression(self, node: torch.fx.Node) -> str:
        packet = node.target.overloadpacket
        result = node.meta["val"].dtype
        if result not in _DTYPES or any(k not in ("dtype", "alpha") for k in node.kwargs):
            raise Unsupported(f"{node.target} with {result} {dict(node.kwargs)}")
        args = node.args
        promoted = torch.result_type(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args[:2])) \
            if len(args) >= 2 and packet is not _aten.where else result
        if packet is _aten.div and not promoted.is_floating_point:  # (true division of integers)
            promoted = result
        if packet in _BINARY or packet in (_aten.div, _aten.rsub):
            a, b = (self.operand(x, promoted) for x in (args[1::-1] if packet is _aten.rsub else args[:2]))
            if "alpha" in node.kwargs:
                b = f"({b} * {self.operand(node.kwargs['alpha'], promoted)})"
            if packet is _aten.div:
                return self._divide(node, a, b, promoted)
            return f"{a} {'-' if packet is _aten.rsub else _BINARY[packet]} {b}"
        x = self.operand(args[0], result)
        if packet is _aten.sqrt:
            return _square_root(x, result)
        if packet is _aten.rsqrt:
            return _divide(self.operand(1.0, result), _square_root(x, result), result)
        if packet is _aten.reciprocal:
            return _divide(self.operand(1.0, result), x, result)
        if packet is _aten.abs:
            return f"tl.abs({x})"
        if packet is _aten.neg:
            return f"-{x}"
        if packet is _aten.logical_not:
            return f"{x} == 0"
        if packet is _aten.sign:
            zero = self.operand(0, result)
            return f"tl.where({x} > {zero}, 1, tl.where({x} < {zero}, -1, {x}))"
        if packet in _SAME:
            return x
        if packet is _aten.where:
            dtype = torch.result_type(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args[1:3]))
            return (f"tl.where({self.operand(args[0], torch.bool)}, {self.operand(args[1], dtype)}, "
                    f"{self.operand(args[2], dtype)})")
        if packet in (_aten.maximum, _aten.minimum):
            return (f"tl.{packet.__name__}({self.operand(args[0], promoted)}, {self.operand(args[1], promoted)}, "
                    "propagate_nan=tl.PropagateNan.ALL)")
        if packet is _aten.pow and not isinstance(args[1], torch.fx.Node) and args[1] in (1, 2, 0.5):
            return {1: x, 2: f"{x} * {x}", 0.5: _square_root(x, result)}[args[1]]
        if packet is _aten.pow and self.cuda:  # (a capturable step's beta ** t: CUDA's powf, as eager)
            return f"libdevice.pow({x}, {self.operand(args[1], result)})"
        raise Unsupported(str(node.target))

    def _divide(self, node: torch.fx.Node, a: str, b: str, dtype: torch.dtype) -> str:
        """``a / b`` as eager torch computes it (see the class docstring)."""
        numerator, denominator = (self.kind.get(x, "number") for x in node.args[:2])
        if numerator == "number" and denominator != "number":
            return f"{_divide(self.operand(1.0, dtype), b, dtype)} * {a}"
        if self.cuda and numerator == "elementwise" and denominator in ("number", "cpu"):
            return f"{a} * {_divide(self.operand(1.0, dtype), b, dtype)}"
        return _divide(a, b, dtype)


def _divide(a: str, b: str, dtype: torch.dtype) -> str:
    """IEEE division (triton's ``/`` in float32 is an approximation)."""
    return f"tl.div_rn({a}, {b})" if dtype == torch.float32 else f"{a} / {b}"


def _square_root(x: str, dtype: torch.dtype) -> str:
    """IEEE square root (triton's ``tl.sqrt`` in float32 is an approximation)."""
    return f"tl.sqrt_rn({x})" if dtype == torch.float32 else f"tl.sqrt({x})"
