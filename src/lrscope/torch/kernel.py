"""A family's formula and every statistic of its eta in one compiled loop (CPU).

The formula is the family's own (``formulas/``, the one place it is written): PyTorch's
tracer (``make_fx``) records it on a few example elements as a graph of aten operations,
and each operation becomes one line of a numba function, ``formula``.  The kernel walks a
flat range of the state in blocks of ``BLOCK`` elements.  One vectorised loop per block
computes eta, the update and the eps-dominated flag of each element (``formula``, inlined)
and adds them to the block's sums (min and max of eta's bits read as ordered integers,
sum, sum of squares, eps-dominated count, update and parameter squared norms), and writes
each element's float32 bit bucket (``stats.mapping``) to a block-sized buffer that stays
in L1; a second, scalar loop counts the buckets.  So each state tensor is read from memory
once, and nothing per element is written back.

Per-step values (t, lr, beta powers) are arguments, the other hyperparameters constants:
a new step or lr compiles nothing, a new family, option set or dtype compiles once (about
a second).  ``formula`` is compiled without fast-math: each operation is the one eager
torch runs, in its dtype, correctly rounded, so eta falls in the buckets of the eager path
(a division by a per-step scalar stays a division; a Python number divided by a tensor is
the reciprocal times the number, as ``Tensor.__rtruediv__`` computes it).  The exception
is a square root: torch's vectorised CPU ``sqrt`` is within one unit in the last place of
the correctly rounded root, not always equal to it, so with Adam a few elements in a
million fall in a neighbouring bucket.  Only the kernel's sums are reordered (``fastmath``
reassociation, so that they vectorise), summed per block in the values' own dtype (in
float32 as torch's own float32 reductions are) and over the blocks in float64.

>>> import torch
>>> def formula(view):   # eta = lr / (sqrt(v) + eps), no update
...     return view["lr"] / (view["v"].sqrt() + 1e-8), None, view["v"] * 0
>>> kernel = Kernel.build(formula, {"v": torch.full((4,), 4.0), "param": torch.ones(4)},
...                       {"lr": torch.tensor(0.1, dtype=torch.float64)})
>>> counts, out = np.zeros(mapping.FLOAT32_BUCKETS, np.int32), np.zeros(len(STATISTICS))
>>> kernel.run({"v": np.full(5, 4.0, np.float32), "param": np.ones(5, np.float32)},
...            {"lr": 0.1}, counts, out)
>>> out.round(6).tolist()   # min, max, sum, sum of squares, eps count, |update|^2, |theta|^2
[0.05, 0.05, 0.25, 0.0125, 0.0, 0.0, 5.0]
>>> int(counts.sum())
5
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lrscope.stats import mapping

#: Elements per block: one block of bucket indices (4 KiB) stays in L1 between the loop
#: that computes them and the loop that counts them.
BLOCK = 2048
#: The row of ``out`` filled by a kernel.
STATISTICS = ("min", "max", "sum", "sum_of_squares", "eps_dominated", "update_squared", "param_squared")

_aten = torch.ops.aten
_NUMPY_TYPE = {torch.float32: "np.float32", torch.float64: "np.float64", torch.bool: "np.bool_",
               torch.int64: "np.int64", torch.int32: "np.int32"}
_BINARY = {_aten.add: "+", _aten.sub: "-", _aten.mul: "*", _aten.div: "/", _aten.lt: "<",
           _aten.le: "<=", _aten.gt: ">", _aten.ge: ">=", _aten.eq: "==", _aten.ne: "!=",
           _aten.logical_and: "and", _aten.logical_or: "or", _aten.bitwise_and: "&",
           _aten.bitwise_or: "|"}
_UNARY = {_aten.sqrt: "np.sqrt({})", _aten.abs: "np.abs({})", _aten.neg: "-{}",
          _aten.sign: "np.sign({})", _aten.reciprocal: "1 / {}", _aten.rsqrt: "1 / np.sqrt({})",
          _aten.logical_not: "not {}", _aten.exp: "np.exp({})", _aten.log: "np.log({})"}
_SAME = {_aten.clone, _aten.alias, _aten.detach, _aten.lift_fresh_copy, _aten._to_copy}
#: torch's CPU ``pow(tensor, scalar)`` takes these exponents as the named operations.
_POWERS = {2: "{0} * {0}", 3: "{0} * {0} * {0}", 0.5: "np.sqrt({0})", -0.5: "1 / np.sqrt({0})",
           -1: "1 / {0}", -2: "1 / ({0} * {0})", 1: "{0}"}

_KERNEL_TEMPLATE = '''
def formula({formula_arguments}):
{body}
    return eta, update, theta, eps


def kernel({arguments}, counts, out):
{prelude}
    low = {key_max}
    high = {key_min}
    total = 0.0
    squares = 0.0
    eps_count = 0.0
    update_squared = 0.0
    param_squared = 0.0
    keys = np.empty(BLOCK, np.uint16)
    for begin in range(0, a0.size, BLOCK):
        end = min(begin + BLOCK, a0.size)
{slices}
        block_low = {key_max}
        block_high = {key_min}
        block_eps = {eta_type}(0)
        block_total = {eta_type}(0)
        block_squares = {eta_type}(0)
        block_update = {update_type}(0)
        block_param = {theta_type}(0)
        for i in range(a0_block.size):
            eta, update, theta, eps = formula({formula_call})
            block_total += eta
            block_squares += eta * eta
            block_eps += {eta_type}(1) if eps else {eta_type}(0)
            block_update += update * update
            block_param += theta * theta
            key = ordered(eta)
            block_low = min(block_low, key)
            block_high = max(block_high, key)
            keys[i] = bucket(np.float32(eta))
        low = min(low, block_low)
        high = max(high, block_high)
        eps_count += np.float64(block_eps)
        total += np.float64(block_total)
        squares += np.float64(block_squares)
        update_squared += np.float64(block_update)
        param_squared += np.float64(block_param)
        for i in range(a0_block.size):
            counts[keys[i]] += 1
    extremes = np.empty(2, {int_type})
    extremes[0] = low ^ ((low >> {sign_shift}) & {key_max})
    extremes[1] = high ^ ((high >> {sign_shift}) & {key_max})
    values = extremes.view({eta_type})
    out[0] = values[0]
    out[1] = values[1]
    out[2] = total
    out[3] = squares
    out[4] = eps_count
    out[5] = update_squared
    out[6] = param_squared
'''


class Unsupported(Exception):
    """The traced formula holds an operation this module does not translate."""


def _literal(value: Any, dtype: torch.dtype) -> str:
    """A Python constant as numba source in ``dtype``."""
    if isinstance(value, bool) or dtype == torch.bool:
        return repr(bool(value))
    return f"{_NUMPY_TYPE[dtype]}({float(value)!r})" if dtype.is_floating_point else f"{_NUMPY_TYPE[dtype]}({int(value)})"


def _value_of(arg: Any) -> Any:
    """What torch's type promotion sees of a node argument: its example value or the
    Python number."""
    return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg


class _Translation:
    """Numba source lines of a traced graph: 0-d nodes once before the loop (``prelude``),
    the others once per element (``body``, of the function ``formula`` whose arguments are
    the per-element inputs ``elements`` and the prelude's values it uses, ``invariants``)."""

    def __init__(self, graph: torch.fx.Graph, arrays: list[str], scalars: list[str], numbers: set[str]):
        self.names: dict[torch.fx.Node, str] = {}
        self.elementwise: set[torch.fx.Node] = set()
        self.numbers: set[torch.fx.Node] = set()  # 0-d values that eager code holds as Python numbers
        self._number_names = numbers
        self.prelude: list[str] = []
        self.body: list[str] = []
        self.arrays: list[str] = []  # the per-element inputs the graph uses, in argument order
        self.elements: list[str] = []  # their names in the body, in the same order
        self.invariants: set[str] = set()
        self.scalar_names: list[str] = []  # the kernel's names of the 0-d inputs, in order
        placeholders = iter([*(("a", name) for name in arrays), *(("s", name) for name in scalars)])
        for node in graph.nodes:
            if node.op == "placeholder":
                kind, name = next(placeholders)
                self._placeholder(node, kind, name)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "get_attr":
                raise Unsupported(f"a tensor constant ({node.target}) in the formula")
            elif node.op == "output":
                self.outputs = node.args[0]

    def _placeholder(self, node: torch.fx.Node, kind: str, name: str) -> None:
        index = len(self.names)
        if kind == "a":
            self.names[node] = f"x{index}"
            self.elementwise.add(node)
            if node.users:
                self.arrays.append(name)
                self.elements.append(f"x{index}")
        else:
            self.names[node] = f"s{index}"
            self.scalar_names.append(f"s{index}")
            if name in self._number_names:
                self.numbers.add(node)

    def operand(self, arg: Any, dtype: torch.dtype) -> str:
        """``arg`` converted to the dtype the operation computes in."""
        if isinstance(arg, torch.fx.Node):
            value = self.names[arg]
            return value if arg.meta["val"].dtype == dtype else f"{_NUMPY_TYPE[dtype]}({value})"
        return _literal(arg, dtype)

    def _call(self, node: torch.fx.Node) -> None:
        packet = node.target.overloadpacket
        result = node.meta["val"].dtype
        if result not in _NUMPY_TYPE or any(k not in ("dtype", "alpha") for k in node.kwargs):
            raise Unsupported(f"{node.target} with {result} {dict(node.kwargs)}")
        values = [_value_of(a) for a in node.args]
        if packet in _BINARY:
            dtype = torch.result_type(*values[:2])
            a, b = (self.operand(x, dtype) for x in node.args[:2])
            if "alpha" in node.kwargs:
                b = f"{b} * {_literal(node.kwargs['alpha'], dtype)}"
            expression = f"({a} {_BINARY[packet]} {b})"
            if packet is _aten.div and dtype.is_floating_point and node.args[0] in self.numbers \
                    and self._varies(node.args[1]):
                # Eager ``number / tensor`` is ``tensor.reciprocal() * number`` (Tensor.__rtruediv__).
                expression = f"(({_literal(1, dtype)} / {b}) * {a})"
        elif packet is _aten.rsub:
            dtype = torch.result_type(*values[:2])
            expression = f"({self.operand(node.args[1], dtype)} - {self.operand(node.args[0], dtype)})"
        elif packet in _UNARY:
            expression = _UNARY[packet].format(f"({self.operand(node.args[0], result)})")
        elif packet in _SAME:
            expression = self.operand(node.args[0], result)
        elif packet is _aten.where:
            dtype = torch.result_type(*values[1:3])
            a, b = (self.operand(x, dtype) for x in node.args[1:3])
            expression = f"({a} if {self.operand(node.args[0], torch.bool)} else {b})"
        elif packet in (_aten.maximum, _aten.minimum):
            dtype = torch.result_type(*values[:2])
            a, b = (self.operand(x, dtype) for x in node.args[:2])
            expression = f"np.{packet.__name__}({a}, {b})"
        elif packet is _aten.pow and not isinstance(node.args[1], torch.fx.Node):
            base = f"({self.operand(node.args[0], result)})"
            exponent = node.args[1]
            template = _POWERS.get(exponent, "{0} ** " + _literal(exponent, result))
            expression = template.format(base)
        elif packet is _aten.pow and not isinstance(node.args[0], torch.fx.Node):
            expression = f"({_literal(node.args[0], result)} ** {self.operand(node.args[1], result)})"
        else:
            raise Unsupported(str(node.target))
        name = f"v{len(self.names)}"
        self.names[node] = name
        line = f"{name} = {_NUMPY_TYPE[result]}({expression})"
        if any(self._varies(a) for a in node.args):
            self.elementwise.add(node)
            self.body.append(line)
            self._uses(node.args)
        else:
            self.prelude.append(line)
            if all(a in self.numbers for a in node.args if isinstance(a, torch.fx.Node)):
                self.numbers.add(node)

    def _varies(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg in self.elementwise

    def _uses(self, args: Any) -> None:
        """Note the prelude's values among ``args`` as arguments of ``formula``."""
        self.invariants.update(self.names[a] for a in args if isinstance(a, torch.fx.Node) and not self._varies(a))

    def per_element(self, name: str, output: Any, dtype: torch.dtype) -> None:
        """Bind ``name`` to a graph output, as ``dtype``, in ``formula``."""
        self.body.append(f"{name} = {self.operand(output, dtype)}")
        self._uses([output])


def trace(formula: Callable[[dict[str, torch.Tensor]], tuple[Any, Any, Any]],
          arrays: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> torch.fx.Graph:
    """The aten graph of ``formula(view) -> (eta, eps_dominated or None, update)`` with
    ``arrays`` and ``scalars`` as its view (placeholders in that order), whose outputs are
    (eta, update, param) and eps_dominated if not None.  Fake tensors: a formula that
    branches on a value raises (``torch.fx`` data-dependent error) instead of compiling the
    branch of the example."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names = [*arrays, *scalars]

    def traced(*values: torch.Tensor) -> tuple[Any, ...]:
        view = dict(zip(names, values))
        eta, eps, update = formula(view)
        return (eta, update, view["param"]) if eps is None else (eta, update, view["param"], eps)

    with torch.no_grad():
        return make_fx(traced, tracing_mode="fake")(*arrays.values(), *scalars.values()).graph


@dataclass
class Kernel:
    """One compiled loop: ``run`` fills ``counts`` (float32 bit buckets of eta, int32) and
    ``out`` (``STATISTICS``, float64)."""

    function: Callable[..., None]
    source: str  # of ``function``, for reading
    arrays: list[str]
    scalars: list[str]
    has_eps: bool

    @classmethod
    def build(cls, formula: Callable[[dict[str, torch.Tensor]], tuple[Any, Any, Any]],
              arrays: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor],
              numbers: frozenset[str] = frozenset()) -> "Kernel":
        """Trace ``formula(view) -> (eta, eps_dominated or None, update)`` with ``arrays``
        (flat per-element examples, ``param`` among them) and ``scalars`` (0-d tensors:
        arguments of the kernel; those named in ``numbers`` stand for the Python numbers
        of the eager formula) as its view (``trace``), and compile it."""
        translation = _Translation(trace(formula, arrays, scalars), list(arrays), list(scalars), set(numbers))
        eta, update, theta, *eps = translation.outputs
        eta_dtype = eta.meta["val"].dtype
        if eta_dtype not in (torch.float32, torch.float64):
            raise Unsupported(f"eta in {eta_dtype}")
        translation.per_element("eta", eta, eta_dtype)
        translation.per_element("update", update, update.meta["val"].dtype)
        translation.per_element("theta", theta, theta.meta["val"].dtype)
        translation.per_element("eps", eps[0] if eps else False, torch.bool)
        source = _source(translation, eta_dtype, update.meta["val"].dtype, theta.meta["val"].dtype)
        return cls(_compile(source), source, translation.arrays, list(scalars), bool(eps))

    def run(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], counts: np.ndarray,
            out: np.ndarray) -> None:
        """Add the bucket counts of the flat ``arrays`` (of equal size) to ``counts`` and write
        their ``out`` row; releases the GIL while it runs."""
        self.function(*(arrays[name] for name in self.arrays), *(scalars[name] for name in self.scalars),
                      counts, out)


def _source(translation: _Translation, eta_dtype: torch.dtype, update_dtype: torch.dtype,
            theta_dtype: torch.dtype) -> str:
    """``_KERNEL_TEMPLATE`` around the translated formula."""
    wide = eta_dtype == torch.float64
    invariants = sorted(translation.invariants)
    return _KERNEL_TEMPLATE.format(
        formula_arguments=", ".join(translation.elements + invariants),
        formula_call=", ".join([f"a{i}_block[i]" for i in range(len(translation.arrays))] + invariants),
        body="\n".join("    " + line for line in translation.body),
        arguments=", ".join([f"a{i}" for i in range(len(translation.arrays))] + translation.scalar_names),
        prelude="\n".join("    " + line for line in translation.prelude) or "    pass",
        key_max="np.int64(0x7FFFFFFFFFFFFFFF)" if wide else "np.int32(0x7FFFFFFF)",
        key_min="np.int64(-0x8000000000000000)" if wide else "np.int32(-0x80000000)",
        sign_shift=63 if wide else 31, eta_type=_NUMPY_TYPE[eta_dtype],
        update_type=_NUMPY_TYPE[update_dtype], theta_type=_NUMPY_TYPE[theta_dtype],
        int_type="np.int64" if wide else "np.int32",
        slices="\n".join(f"        a{i}_block = a{i}[begin:end]" for i in range(len(translation.arrays))),
    )


def _compile(source: str) -> Callable[..., None]:
    """The functions of ``source`` compiled: ``formula`` without fast-math (each operation
    rounded as torch rounds it), inlined by LLVM into ``kernel``, whose only floating-point
    operations of its own are the sums, reassociated so that they vectorise."""
    import numba

    namespace: dict[str, Any] = {"np": np, "BLOCK": BLOCK, **_intrinsics()}
    exec(compile(source, "<lrscope kernel>", "exec"), namespace)  # noqa: S102 - generated above
    namespace["formula"] = numba.njit(error_model="numpy", fastmath=False)(namespace["formula"])
    return numba.njit(nogil=True, error_model="numpy", fastmath={"reassoc"})(namespace["kernel"])


@functools.cache
def _intrinsics() -> dict[str, Any]:
    """``ordered(x)``: the bits of a float as a signed integer of its width, ordered as the
    floats are (NaNs beyond the infinities); ``bucket(x)``: a float32's bit bucket
    (``bits >> mapping.FLOAT32_SHIFT``, sign included) as uint16.  Bit operations in the
    float's width: numba's own integer arithmetic widens to int64, and a loop holding int64
    vectorises at half the width."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def ordered(typingctx: Any, x: Any) -> Any:
        width = x.bitwidth
        integer = ir.IntType(width)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            bits = builder.bitcast(args[0], integer)
            magnitude = builder.and_(builder.ashr(bits, ir.Constant(integer, width - 1)),
                                     ir.Constant(integer, (1 << (width - 1)) - 1))
            return builder.xor(bits, magnitude)
        return getattr(types, f"int{width}")(x), codegen

    @intrinsic
    def bucket(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            bits = builder.bitcast(args[0], ir.IntType(32))
            return builder.trunc(builder.lshr(bits, ir.Constant(ir.IntType(32), mapping.FLOAT32_SHIFT)),
                                 ir.IntType(16))
        return types.uint16(types.float32), codegen

    return {"ordered": ordered, "bucket": bucket}
