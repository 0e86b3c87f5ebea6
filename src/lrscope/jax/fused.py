"""eta and every statistic of it in one compiled pass inside a jitted step (single CPU device).

Measured with XLA, a tensor's statistics take several passes over memory: one that
computes eta (and the eps-dominated mask) and writes it out, the counting and reductions
of ``lrscope.jax.kernel`` that read it back, and the update and parameter norms, each of
which computes eta again.  Here the family's formula (``formulas/``, the one place it is
written) is traced by jax (``jax.make_jaxpr``) and each per-element operation of its
jaxpr becomes one line of a numba function, inlined into the loop of
``lrscope.stats.compiled``, which an XLA FFI target (``lrscope.jax.kernel``'s handler
structures) calls on XLA's own buffers: each state tensor is read once and nothing per
element is written.  The operations on per-step values (the bias corrections, the lr of
a schedule) stay in the jitted step, where XLA computes them, and reach the kernel as
arguments: a new step compiles nothing, a new family, option set or dtype compiles once.

Each operation is translated to the one XLA runs, in its dtype, correctly rounded as
XLA:CPU rounds it (``+ - * /``, comparisons, ``sqrt``, ``abs``, ``max``, ``min``,
selections, conversions; the kernel is compiled without fast-math), so eta, its buckets,
extremes and eps-dominated count are those of the XLA path (tested on every family
this path takes); only the sums are reordered.  A formula holding any other operation
(a transcendental function, whose XLA approximation numba would not reproduce, a
reduction, a non-scalar broadcast) raises ``Unsupported``, and the caller measures it
with XLA as before.

>>> import jax, jax.numpy as jnp, numpy as np
>>> def formula(arrays, scalars):   # eta = lr / (sqrt(v) + eps); update -eta; theta
...     eta = scalars["lr"] / (jnp.sqrt(arrays["v"]) + 1e-8)
...     return eta, -eta, arrays["param"], None
>>> v, param = jnp.full((5,), 4.0), jnp.ones(5)
>>> if kernel.available():
...     counts, stats, dominated = jax.jit(lambda v, p, lr: statistics(
...         formula, {"v": v, "param": p}, {"lr": lr}))(v, param, jnp.float32(0.1))
...     print(int(counts.sum()), np.asarray(stats).round(6).tolist(), int(dominated))
... else:  # without numba
...     print(5, [0.05, 0.05, 0.25, 0.0125, 0.0125, 5.0], -1)
5 [0.05, 0.05, 0.25, 0.0125, 0.0125, 5.0] -1
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from lrscope._warnings import warn
from lrscope.jax import kernel
from lrscope.stats import compiled, mapping

#: The per-tensor statistics ``statistics`` returns (in the statistics' dtype), in order,
#: and their names in the compiled loop's row.
STATISTICS = ("min", "max", "sum", "sum_squares", "update_sq", "param_sq")
_FROM_KERNEL = ("min", "max", "sum", "sum_of_squares", "update_squared", "param_squared")

_TYPES = {np.dtype(np.float32): "np.float32", np.dtype(np.float64): "np.float64",
          np.dtype(np.int32): "np.int32", np.dtype(np.int64): "np.int64",
          np.dtype(np.bool_): "np.bool_", np.dtype(np.uint32): "np.uint32"}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
           "ge": ">=", "eq": "==", "ne": "!="}
_LOGICAL = {"and": "and", "or": "or"}
_UNARY = {"neg": "-{}", "sqrt": "np.sqrt({})", "rsqrt": "{one} / np.sqrt({})", "abs": "np.abs({})",
          "sign": "np.sign({})", "square": "{0} * {0}", "copy": "{}", "copy_p": "{}"}
#: Call primitives whose inner jaxpr is translated in place (jnp functions are ``jit``s).
_CALLS = ("jit", "pjit", "closed_call", "core_call")


class Unsupported(Exception):
    """The traced formula holds an operation this module does not translate exactly."""


class _Translation:
    """Numba source lines of a jaxpr's per-element operations (``body``, of a function whose
    arguments are the per-element inputs, then the per-step values it uses, ``invariants``),
    and the values of those (traced in the enclosing step, ``values``).

    An operand is a str (the numba name of a per-element value) or an ``_Invariant``.
    """

    def __init__(self) -> None:
        self.body: list[str] = []
        self.invariants: list[str] = []
        self.values: list[Any] = []
        self.types: dict[str, np.dtype] = {}
        self.used: set[str] = set()  # the per-element inputs the body reads
        self._argument: dict[int, tuple[str, Any]] = {}  # by the id of the value

    def walk(self, jaxpr: core.Jaxpr, inputs: list[Any]) -> list[Any]:
        env: dict[core.Var, Any] = dict(zip(jaxpr.invars, inputs))

        def read(atom: Any) -> Any:
            if isinstance(atom, core.Literal):
                return _Invariant(atom.val, np.dtype(atom.aval.dtype), literal=True)
            return env[atom]

        for eqn in jaxpr.eqns:
            operands = [read(a) for a in eqn.invars]
            name = eqn.primitive.name
            if name in _CALLS:
                inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                inner = getattr(inner, "jaxpr", inner)
                if inner.constvars:
                    raise Unsupported(f"constants in {name}")
                outputs = self.walk(inner, operands)
            elif name == "broadcast_in_dim" and isinstance(operands[0], _Invariant):
                if np.ndim(operands[0].value):
                    raise Unsupported("a broadcast of an array")
                outputs = operands  # a per-step value broadcast to the elements stays one
            elif all(isinstance(x, _Invariant) for x in operands):
                outputs = self._evaluate(eqn, operands)
            else:
                outputs = [self._line(eqn, operands)]
            for var, value in zip(eqn.outvars, outputs):
                env[var] = value
        return [read(a) for a in jaxpr.outvars]

    @staticmethod
    def _evaluate(eqn: Any, operands: list["_Invariant"]) -> list["_Invariant"]:
        """A per-step operation, bound in the enclosing step (XLA computes it there)."""
        out = eqn.primitive.bind(*(x.value for x in operands), **eqn.params)
        out = out if eqn.primitive.multiple_results else [out]
        if any(np.ndim(x) for x in out):
            raise Unsupported(f"{eqn.primitive.name} makes an array of per-step values")
        return [_Invariant(x, np.dtype(v.aval.dtype)) for x, v in zip(out, eqn.outvars)]

    def operand(self, x: Any, dtype: np.dtype) -> str:
        """``x`` as numba source in ``dtype`` (the operations' operands share their dtype)."""
        if isinstance(x, str):
            self.used.add(x)
            return x if self.types[x] == dtype else f"{_type(dtype)}({x})"
        if x.literal:
            value = np.asarray(x.value).item()
            return repr(bool(value)) if dtype == np.bool_ else f"{_type(dtype)}({value!r})"
        key = id(x.value)
        if key not in self._argument:  # it holds the value too: its id stays its own
            self._argument[key] = (f"s{len(self.invariants)}", x.value)
            self.invariants.append(self._argument[key][0])
            self.values.append(jnp.asarray(x.value, x.dtype))
            self.types[self._argument[key][0]] = x.dtype
        name = self._argument[key][0]
        return name if x.dtype == dtype else f"{_type(dtype)}({name})"

    def _line(self, eqn: Any, operands: list[Any]) -> str:
        name, out = eqn.primitive.name, np.dtype(eqn.outvars[0].aval.dtype)
        if len(eqn.outvars) != 1:
            raise Unsupported(name)
        dtypes = [np.dtype(v.aval.dtype) for v in eqn.invars]
        if name in _BINARY:
            if name == "div" and not np.issubdtype(dtypes[0], np.floating):
                raise Unsupported("an integer division")
            a, b = (self.operand(x, dtypes[0]) for x in operands)
            expression = f"({a} {_BINARY[name]} {b})"
        elif name in _LOGICAL and out == np.bool_:
            a, b = (self.operand(x, out) for x in operands)
            expression = f"({a} {_LOGICAL[name]} {b})"
        elif name == "not" and out == np.bool_:
            expression = f"(not {self.operand(operands[0], out)})"
        elif name in ("max", "min"):
            a, b = (self.operand(x, dtypes[0]) for x in operands)
            expression = f"np.{name}imum({a}, {b})"
        elif name in _UNARY:
            a = self.operand(operands[0], dtypes[0])
            expression = _UNARY[name].format(f"({a})", one=f"{_type(out)}(1)")
        elif name == "integer_pow" and eqn.params["y"] in (1, 2, -1):
            a = f"({self.operand(operands[0], dtypes[0])})"
            expression = {1: a, 2: f"{a} * {a}", -1: f"{_type(out)}(1) / {a}"}[eqn.params["y"]]
        elif name == "convert_element_type":
            a = self.operand(operands[0], dtypes[0])
            expression = f"({a} != 0)" if out == np.bool_ else f"{_type(out)}({a})"
        elif name == "select_n" and len(operands) == 3:
            which = self.operand(operands[0], dtypes[0])
            a, b = (self.operand(x, out) for x in operands[1:])
            expression = f"({b} if {which} else {a})"
        elif name == "broadcast_in_dim":  # an array already of its shape
            expression = self.operand(operands[0], out)
        else:
            raise Unsupported(name)
        result = f"v{len(self.types)}"
        self.types[result] = out
        self.body.append(f"{result} = {_type(out)}({expression})")
        return result


class _Invariant:
    """A per-step value: traced in the enclosing step, or a literal of the jaxpr."""

    def __init__(self, value: Any, dtype: np.dtype, literal: bool = False) -> None:
        self.value, self.dtype, self.literal = value, dtype, literal


def _type(dtype: np.dtype) -> str:
    if dtype not in _TYPES:
        raise Unsupported(f"values in {dtype}")
    return _TYPES[dtype]


def statistics(formula: Callable[[dict[str, Any], dict[str, Any]], tuple[Any, Any, Any, Any]],
               arrays: dict[str, jax.Array], scalars: dict[str, Any], keep: int | None = None
               ) -> tuple[Any, jax.Array, jax.Array]:
    """The bucket counts of eta (int32, every value's), the min, max, sum and sum of squares
    of its finite values, the update and parameter squared norms (``STATISTICS``) and the
    eps-dominated count (int32; -1 where the formula has none), from one compiled pass over
    ``arrays`` (and a second where eta is not finite everywhere).  With ``keep``, instead
    of the full row of counts, its first ``keep`` nonzero buckets (indices and counts, -1
    and 0 past the last) and the number of nonzero buckets beyond them: ``(index, count,
    more)``, a 64th of the memory that XLA has to allocate, write and read again.

    ``formula(arrays, scalars) -> (eta, update, theta, eps_dominated or None)`` is traced
    with flat ``arrays`` (equal sizes, float32 or float64) and 0-d ``scalars``; raises
    ``Unsupported`` where it cannot be compiled exactly.  Only where ``kernel.available()``.
    """
    flat = {k: jnp.ravel(v) for k, v in arrays.items()}
    examples = {k: jax.ShapeDtypeStruct((2,), v.dtype) for k, v in flat.items()}
    for k, v in scalars.items():
        if np.ndim(v):
            raise Unsupported(f"the per-step value {k} is an array")
    closed = jax.make_jaxpr(formula)(examples, scalars)
    if closed.consts:
        raise Unsupported("constant arrays in the formula")
    translation = _Translation()
    values = jax.tree_util.tree_leaves(flat)  # in the order of the jaxpr's inputs
    inputs: list[Any] = []
    for i, v in enumerate(values):
        inputs.append(f"x{i}")
        translation.types[f"x{i}"] = np.dtype(v.dtype)
    scalar_leaves = jax.tree_util.tree_leaves(scalars)
    inputs += [_Invariant(jnp.asarray(v), np.dtype(jnp.asarray(v).dtype)) for v in scalar_leaves]
    eta, update, theta, *eps = translation.walk(closed.jaxpr, inputs)
    eta_type = _output_type(closed.jaxpr.outvars[0])
    if eta_type not in (np.float32, np.float64):
        raise Unsupported(f"eta in {eta_type}")
    update_type, theta_type = (_output_type(v) for v in closed.jaxpr.outvars[1:3])
    body = list(translation.body)
    for name, value, dtype in (("eta", eta, eta_type), ("update", update, update_type),
                               ("theta", theta, theta_type)):
        body.append(f"{name} = {translation.operand(value, dtype)}")
    body.append(f"eps = {translation.operand(eps[0], np.dtype(np.bool_)) if eps else 'False'}")
    used = [i for i in range(len(values)) if f"x{i}" in translation.used] or [0]
    source = compiled.source(
        body=body, prelude=[], elements=[f"x{i}" for i in used], invariants=translation.invariants,
        arrays=len(used), scalars=translation.invariants, eta_type=_type(eta_type),
        update_type=_type(update_type), theta_type=_type(theta_type))
    f = jnp.result_type(float)
    target = _target(source, tuple(str(values[i].dtype) for i in used),
                     tuple(str(translation.types[s]) for s in translation.invariants), str(np.dtype(f)),
                     keep is not None)
    int32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    counts = [int32((mapping.FLOAT32_BUCKETS,))] if keep is None else [int32((keep,)), int32((keep,)), int32(())]
    *counts, stats, dominated = jax.ffi.ffi_call(
        target, (*counts, jax.ShapeDtypeStruct((len(STATISTICS),), f), int32(())),
        vmap_method="sequential")(*(values[i] for i in used), *translation.values)
    return (counts[0] if keep is None else tuple(counts)), stats, (
        dominated if eps else jnp.asarray(-1, jnp.int32))


def _output_type(var: Any) -> np.dtype:
    return np.dtype(var.aval.dtype)


def _target(source: str, array_types: tuple[str, ...], scalar_types: tuple[str, ...],
            stat_type: str, keep: bool) -> str:
    """The name of the FFI target that runs ``source``'s kernel on XLA buffers of
    ``array_types`` and 0-d ones of ``scalar_types``, its statistics in ``stat_type``
    (and its counts' first nonzero ones where ``keep``), compiled and registered once.  A
    compilation that fails warns once and raises ``Unsupported`` (then and for every
    later step: the XLA path measures it)."""
    key = hashlib.sha1(f"{source}{array_types}{scalar_types}{stat_type}{keep}".encode()).hexdigest()[:16]
    if key not in _targets:
        try:
            _targets[key] = _register(f"lrscope_fused_{key}", source, array_types, scalar_types,
                                      stat_type, keep)
        except Exception as error:  # noqa: BLE001 - numba or XLA refused it: the XLA path is exact
            _targets[key] = None
            warn(f"lrscope: compiling the Optax statistics of this formula failed "
                 f"({type(error).__name__}: {error}); XLA computes them (slower, same statistics)")
    if _targets[key] is None:
        raise Unsupported("its compilation failed")
    return _targets[key]


#: The FFI target of each kernel by its key, None where its compilation failed.
_targets: dict[str, str | None] = {}


def _register(name: str, source: str, array_types: tuple[str, ...], scalar_types: tuple[str, ...],
              stat_type: str, keep: bool) -> str:
    """Compile ``source`` (once for both forms of its counts) and an FFI handler, and
    register it with XLA as ``name``."""
    import numba
    from numba import types

    function, finite = compiled.compile_kernel(source, "kernel"), compiled.compile_kernel(source, "finite")
    n = len(array_types)
    arrays = ", ".join(f"data(sources[{i}], n, {_type(np.dtype(t))})" for i, t in enumerate(array_types))
    scalars = "".join(f", data(sources[{n + i}], 1, {_type(np.dtype(t))})[0]"
                      for i, t in enumerate(scalar_types))
    picked = ", ".join(f"out[{compiled.STATISTICS.index(k)}]" for k in _FROM_KERNEL)
    results = 5 if keep else 3
    if keep:  # counted into a row of its own (in the cache), then its nonzero buckets kept
        counting = f'''counts = np.zeros({mapping.FLOAT32_BUCKETS}, np.int32)
    index = data(results[0], words(words(results[0] + BUFFER_DIMS, 1)[0], 1)[0], np.int32)
    count = data(results[1], index.size, np.int32)'''
        keeping = '''index[:] = -1
    count[:] = 0
    kept = 0
    more = 0
    for bucket in range(counts.size):
        if counts[bucket] != 0:
            if kept < index.size:
                index[kept] = bucket
                count[kept] = counts[bucket]
                kept += 1
            else:
                more += 1
    data(results[2], 1, np.int32)[0] = more'''
    else:
        counting = f'''counts = data(results[0], {mapping.FLOAT32_BUCKETS}, np.int32)
    counts[:] = 0'''
        keeping = "pass"
    handler = f'''
def call(frame):
    if words(frame + {kernel.FRAME_EXTENSION}, 1)[0] != 0:
        return call_metadata(frame)
    sources = words(words(frame + {kernel.FRAME_ARGS}, 1)[0], {n + len(scalar_types)})
    results = words(words(frame + {kernel.FRAME_RETS}, 1)[0], {results})
    n = size(sources[0])
    {counting}
    out = np.zeros({len(compiled.STATISTICS)})
    function({arrays}{scalars}, counts, out)
    if not np.isfinite(out[2]):
        finite({arrays}{scalars}, out)
    {keeping}
    stats = data(results[{results - 2}], {len(STATISTICS)}, {_type(np.dtype(stat_type))})
    stats[:] = np.array([{picked}])
    data(results[{results - 1}], 1, np.int32)[0] = np.int32(out[{compiled.STATISTICS.index("eps_dominated")}])
    return 0
'''
    namespace = {"np": np, "function": function, "finite": finite, "BUFFER_DIMS": kernel.BUFFER_DIMS,
                 **kernel.ffi_helpers()}
    exec(compile(handler, "<lrscope fused handler>", "exec"), namespace)  # noqa: S102 - generated above
    kernel.register(name, numba.cfunc(types.int64(types.int64), nopython=True, nogil=True)(namespace["call"]))
    return name
