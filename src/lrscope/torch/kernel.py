"""A family's formula and every statistic of its eta in one compiled loop (CPU).

The formula is the family's own (``formulas/``, the one place it is written): PyTorch's
tracer (``make_fx``) records it on a few example elements as a graph of aten operations,
and each operation becomes one line of a numba function, ``formula``, inlined into the
loop of ``lrscope.stats.compiled`` that computes eta and every statistic of it in one pass.

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

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lrscope.stats import compiled, mapping
from lrscope.stats.compiled import STATISTICS

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
        return cls(compiled.compile_kernel(source), source, translation.arrays, list(scalars), bool(eps))

    def run(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], counts: np.ndarray,
            out: np.ndarray) -> None:
        """Add the bucket counts of the flat ``arrays`` (of equal size) to ``counts`` and write
        their ``out`` row; releases the GIL while it runs."""
        self.function(*(arrays[name] for name in self.arrays), *(scalars[name] for name in self.scalars),
                      counts, out)


def _source(translation: _Translation, eta_dtype: torch.dtype, update_dtype: torch.dtype,
            theta_dtype: torch.dtype) -> str:
    """``compiled.TEMPLATE`` around the translated formula."""
    return compiled.source(
        body=translation.body, prelude=translation.prelude, elements=translation.elements,
        invariants=sorted(translation.invariants), arrays=len(translation.arrays),
        scalars=translation.scalar_names, eta_type=_NUMPY_TYPE[eta_dtype],
        update_type=_NUMPY_TYPE[update_dtype], theta_type=_NUMPY_TYPE[theta_dtype])
