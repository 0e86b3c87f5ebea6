"""The compiled loop that computes eta and every statistic of it in one pass (CPU, numba),
around a family's formula translated by a framework's tracer (``lrscope.torch.kernel``
from an aten graph, ``lrscope.jax.fused`` from a jaxpr).

The kernel walks a flat range of the state in blocks of ``BLOCK`` elements.  One
vectorised loop per block computes eta, the update and the eps-dominated flag of each
element (``formula``, inlined) and adds them to the block's sums (min and max of eta's bits
read as ordered integers, sum, sum of squares, eps-dominated count, update and parameter
squared norms), and writes each element's float32 bit bucket (``stats.mapping``) to a
block-sized buffer that stays in L1; a second, scalar loop counts the buckets.  So each
state tensor is read from memory once, and nothing per element is written back.  The sums
are summed per block in eta's own dtype and over the blocks in float64.  ``finite``, a
second loop over the same formula, takes the min, max, sum and sum of squares of the finite
values of eta only (none finite: inf, -inf, 0, 0); a caller runs it where the kernel's sum
is not finite (a NaN or an infinite eta, or a sum that overflows), rarely.

>>> body = ["eta = np.float32(1) / (np.sqrt(x0) + s)", "update = -eta", "theta = x0", "eps = False"]
>>> code = source(body=body, prelude=[], elements=["x0"], invariants=["s"], arrays=1, scalars=["s"],
...               eta_type="np.float32", update_type="np.float32", theta_type="np.float32")
>>> kernel = compile_kernel(code)
>>> counts, out = np.zeros(mapping.FLOAT32_BUCKETS, np.int32), np.zeros(len(STATISTICS))
>>> kernel(np.full(3, 4.0, np.float32), np.float32(0), counts, out)
>>> out.tolist()   # min, max, sum, sum of squares, eps count, |update|^2, |theta|^2
[0.5, 0.5, 1.5, 0.75, 0.0, 0.75, 48.0]
>>> int(counts.sum())
3
>>> values = np.array([4.0, 0.0, 1.0], np.float32)   # eta 0.5, inf, 1
>>> kernel(values, np.float32(0), counts, out)
>>> float(out[2])
inf
>>> compile_kernel(code, "finite")(values, np.float32(0), out)
>>> out[:4].tolist()
[0.5, 1.0, 1.5, 1.25]
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from lrscope.stats import mapping

#: Elements per block: one block of bucket indices (4 KiB) stays in L1 between the loop
#: that computes them and the loop that counts them.
BLOCK = 2048
#: The row of ``out`` filled by a kernel.
STATISTICS = ("min", "max", "sum", "sum_of_squares", "eps_dominated", "update_squared", "param_squared")

TEMPLATE = '''
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


def finite({arguments}, out):
{prelude}
    low = {eta_type}(np.inf)
    high = {eta_type}(-np.inf)
    total = 0.0
    squares = 0.0
    for i in range(a0.size):
        eta, update, theta, eps = formula({finite_call})
        if np.isfinite(eta):
            low = min(low, eta)
            high = max(high, eta)
            total += np.float64(eta)
            squares += np.float64(eta) * np.float64(eta)
    out[0] = low
    out[1] = high
    out[2] = total
    out[3] = squares
'''


def source(*, body: list[str], prelude: list[str], elements: list[str], invariants: list[str],
           arrays: int, scalars: list[str], eta_type: str, update_type: str, theta_type: str) -> str:
    """``TEMPLATE`` around a translated formula: ``body``, the lines of ``formula`` (whose
    arguments are the per-element values ``elements``, then the ``invariants``) that bind
    ``eta``, ``update``, ``theta`` and ``eps``; ``prelude``, lines run once per call;
    the kernel's arguments are ``arrays`` flat arrays ``a0, a1, ...``, then ``scalars``;
    the types are numba source (``"np.float32"``)."""
    wide = eta_type == "np.float64"
    return TEMPLATE.format(
        formula_arguments=", ".join(elements + invariants),
        formula_call=", ".join([f"a{i}_block[i]" for i in range(arrays)] + invariants),
        finite_call=", ".join([f"a{i}[i]" for i in range(arrays)] + invariants),
        body="\n".join("    " + line for line in body),
        arguments=", ".join([f"a{i}" for i in range(arrays)] + scalars),
        prelude="\n".join("    " + line for line in prelude) or "    pass",
        key_max="np.int64(0x7FFFFFFFFFFFFFFF)" if wide else "np.int32(0x7FFFFFFF)",
        key_min="np.int64(-0x8000000000000000)" if wide else "np.int32(-0x80000000)",
        sign_shift=63 if wide else 31, eta_type=eta_type, update_type=update_type,
        theta_type=theta_type, int_type="np.int64" if wide else "np.int32",
        slices="\n".join(f"        a{i}_block = a{i}[begin:end]" for i in range(arrays)),
    )


def compile_kernel(source: str, name: str = "kernel") -> Callable[..., None]:
    """The function ``name`` (``kernel`` or ``finite``) of ``source`` compiled: ``formula``
    without fast-math (each operation rounded as the framework rounds it), inlined by LLVM
    into it, whose only floating-point operations of its own are the sums, reassociated so
    that they vectorise.  Each is compiled when first called (or referenced by a compiled
    caller), and ``formula`` once for both."""
    return _compiled(source)[name]


@functools.cache
def _compiled(source: str) -> dict[str, Callable[..., None]]:
    import numba

    namespace: dict[str, Any] = {"np": np, "BLOCK": BLOCK, **intrinsics()}
    exec(compile(source, "<lrscope kernel>", "exec"), namespace)  # noqa: S102 - generated above
    namespace["formula"] = numba.njit(error_model="numpy", fastmath=False)(namespace["formula"])
    return {name: numba.njit(nogil=True, error_model="numpy", fastmath={"reassoc"})(namespace[name])
            for name in ("kernel", "finite")}


@functools.cache
def intrinsics() -> dict[str, Any]:
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
