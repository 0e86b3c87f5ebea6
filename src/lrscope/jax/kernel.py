"""Bucket counts, finite min/max/sum/sum of squares of one array and the True count of a
mask in a compiled loop, called from inside a jitted step on the CPU (an XLA FFI handler
written with numba).

On XLA:CPU the bucket counts of ``lrscope.jax.stats`` are a scatter-add, several times
slower per element than a compiled loop that increments a row of counts, and each of the
four finite reductions is a pass of its own, as is the eps-dominated count (a reduction
with a comparison, which XLA:CPU does not vectorise).  ``bucket_stats`` takes them all in
compiled loops in place on XLA's buffers: a numba ``cfunc`` registered as an XLA FFI target
(the typed custom call API), so nothing is copied and no Python runs during the step.  One
loop over eta counts the buckets, those of ``stats.mapping`` (float32 bits shifted),
identical to the scatter's; a second takes the min, max, sum and sum of squares of every
value, vectorised (min and max compared as integers, the sums in float64 in any order),
which are the finite ones when the sum is finite, else a third takes them masked; one more
counts the eps-dominated mask.  The results are rounded to the array's dtype.  ``compact`` picks the nonzero counts of a table of
them out for the Optax state (``lrscope.jax.compact``), one pass where XLA:CPU would take a
cumulative sum and a scatter.

It is used on a single CPU device only (``available``): a sharded array would be gathered
onto each device for a custom call, so there the jnp statistics run, global by XLA's own
reductions.  Without numba, ``available`` is False.

>>> values = jnp.array([1.0, 1.0, 3.0, jnp.inf], jnp.float32)
>>> counts, stats, above = bucket_stats(values, values > 2)
>>> int(counts.sum()), stats.tolist(), int(above)   # min, max, sum, sum of squares of the finite
(4, [1.0, 3.0, 5.0, 11.0], 2)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrscope._warnings import warn
from lrscope.stats import mapping

#: The FFI targets, one per dtype of the values.
_TARGETS = {np.dtype(np.float32): "lrscope_bucket_stats_f32",
            np.dtype(np.float64): "lrscope_bucket_stats_f64"}
#: The FFI target of ``compact``.
_COMPACT = "lrscope_compact"
#: The XLA FFI API version the handlers declare (``XLA_FFI_API_MAJOR``/``MINOR``).
_API_VERSION = (0, 1)
#: Byte offsets in the XLA FFI C structures (xla/ffi/api/c_api.h, 64-bit): the call
#: frame's extension, argument and result pointers, a buffer's data, rank and dims, the
#: metadata extension's type and metadata, the metadata's API version numbers.
FRAME_EXTENSION, FRAME_ARG_COUNT, FRAME_ARGS, FRAME_RETS = 8, 56, 72, 112
BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 24, 32, 40
_EXTENSION_TYPE, _EXTENSION_METADATA, _METADATA_EXTENSION_TYPE = 8, 24, 1
_METADATA_VERSION = 24


def available() -> bool:
    """Whether the compiled statistics may run: numba is installed, the process sees one
    device, a CPU (no sharding, no other process), and the handlers passed their check."""
    return jax.device_count() == 1 and jax.default_backend() == "cpu" and _checked()


@functools.cache
def _checked() -> bool:
    """Register the handlers and check them once against numpy on a few values (NaN, inf,
    a negative; a small table to compact, past both of its stores): the handlers read XLA's FFI structures at the offsets of the API version
    they declare, so a jax whose FFI differs gets the jnp statistics, with one warning,
    never wrong counts."""
    values = np.array([0.5, 1.0, 3.0, np.inf, np.nan, -2.0, 0.0], np.float32)
    try:
        if _register() is None:
            return False
        with jax.ensure_compile_time_eval():  # run now, also when asked while a step is traced
            counts, reduced, above = jax.jit(bucket_stats)(jnp.asarray(values), jnp.asarray(values > 2))
            table = np.zeros((2, 8), np.int32)
            table[0, [1, 3, 4]], table[1, [0, 2, 5]] = [1, 2, 3], [4, 5, 6]
            kept = jax.jit(compact, static_argnums=(1, 2))(jnp.asarray(table), 2, 1)
        want = np.bincount(values.view(np.uint32) >> mapping.FLOAT32_SHIFT, minlength=mapping.FLOAT32_BUCKETS)
        works = (np.array_equal(np.asarray(counts), want) and np.asarray(reduced).tolist() == [-2.0, 3.0, 2.5, 14.25]
                 and int(above) == 2 and [np.asarray(x).tolist() for x in kept] == [
                     [[1, 3], [0, 2]], [[1, 2], [4, 5]], [4], [3], 1])
        reason = "its results differ from numpy's"
    except Exception as error:  # noqa: BLE001 - any failure of the FFI call: the jnp path is exact
        works, reason = False, f"{type(error).__name__}: {error}"
    if not works:
        warn(f"lrscope: the compiled Optax statistics (lrscope.jax.kernel) do not work with jax "
             f"{jax.__version__} ({reason}); computing them with jnp (slower, same results)")
    return works


@functools.cache
def ffi_helpers() -> dict[str, Any] | None:
    """The compiled helpers of a handler (None without numba): ``pointer(address)``,
    ``words(address, n)`` (``n`` 64-bit words: pointers, sizes), ``data(buffer, n, dtype)``
    (the ``n`` elements of an ``XLA_FFI_Buffer``), ``size(buffer)`` (its element count) and
    ``call_metadata(frame)`` (the answer to XLA's request for the handler's metadata, its
    FFI API version)."""
    try:
        import numba
    except ImportError:
        return None
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def pointer(typingctx: Any, address: Any) -> Any:  # pragma: no cover - compiled
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.int64), codegen

    @numba.njit(inline="always")
    def words(address: Any, n: int) -> Any:  # pragma: no cover - compiled
        return numba.carray(pointer(address), n, dtype=np.int64)

    @numba.njit(inline="always")
    def data(buffer: Any, n: int, dtype: Any) -> Any:  # pragma: no cover - compiled
        return numba.carray(pointer(words(buffer + BUFFER_DATA, 1)[0]), n, dtype=dtype)

    @numba.njit(inline="always")
    def size(buffer: Any) -> int:  # pragma: no cover - compiled
        n = 1
        for d in words(words(buffer + BUFFER_DIMS, 1)[0], words(buffer + BUFFER_RANK, 1)[0]):
            n *= d
        return n

    @numba.njit(inline="always")
    def call_metadata(frame: int) -> int:  # pragma: no cover - compiled
        extension = words(frame + FRAME_EXTENSION, 1)[0]
        kind = numba.carray(pointer(extension + _EXTENSION_TYPE), 1, dtype=np.int32)[0]
        if kind == _METADATA_EXTENSION_TYPE:
            metadata = words(extension + _EXTENSION_METADATA, 1)[0]
            version = numba.carray(pointer(metadata + _METADATA_VERSION), 3, dtype=np.int32)
            version[0], version[1], version[2] = _API_VERSION[0], _API_VERSION[1], 0  # traits
        return 0

    return {"pointer": pointer, "words": words, "data": data, "size": size, "call_metadata": call_metadata}


def register(name: str, call: Any) -> None:
    """Register the numba ``cfunc`` ``call`` as the XLA FFI target ``name`` on the CPU."""
    _HANDLERS.append(call)  # XLA holds the address only
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(call.ctypes), platform="cpu")


@functools.cache
def _register() -> tuple[str, ...] | None:
    """Compile the handlers and register them with XLA once; None without numba."""
    helpers = ffi_helpers()
    if helpers is None:
        return None
    import numba
    from numba import types

    words, data, call_metadata = helpers["words"], helpers["data"], helpers["call_metadata"]
    element_count = helpers["size"]

    shift, buckets = mapping.FLOAT32_SHIFT, mapping.FLOAT32_BUCKETS

    def count_and_reduce(dtype: Any) -> Any:
        """The counting and reducing of one dtype's values."""
        integer = np.int32 if dtype == np.float32 else np.int64
        top, magnitude = np.iinfo(integer).bits - 1, int(np.iinfo(integer).max)

        @numba.njit(inline="always")
        def ordered(bits: Any) -> Any:  # pragma: no cover - compiled
            """A float's bits as an integer in the floats' order, and back (negatives'
            magnitude bits flipped)."""
            return integer(bits ^ ((bits >> top) & magnitude))

        @numba.njit(error_model="numpy", fastmath={"reassoc"})  # not inlined: its own flags
        def plain(values: Any) -> Any:  # pragma: no cover - compiled
            """min, max (as ``ordered`` integers), sum and sum of squares of all the values,
            in any order: vectorised."""
            low, high, total, squares = integer(magnitude), integer(-magnitude - 1), 0.0, 0.0
            for i in range(values.size):
                key = ordered(dtype(values[i]).view(integer))
                low, high = min(low, key), max(high, key)
                wide = np.float64(values[i])
                total += wide
                squares += wide * wide
            return low, high, total, squares

        @numba.njit(inline="always", error_model="numpy")
        def call(counts: Any, values: Any, out: Any) -> None:  # pragma: no cover - compiled
            """Each value's bucket (a pass of its own: the increments keep a loop from being
            vectorised), then the four reductions of the finite values: the plain ones,
            which are those when their sum is finite (every value is), else masked ones."""
            for i in range(values.size):
                counts[np.float32(values[i]).view(np.uint32) >> shift] += 1
            low, high, total, squares = plain(values)
            if values.size and np.isfinite(total):
                out[0], out[1] = ordered(low).view(dtype), ordered(high).view(dtype)
                out[2], out[3] = total, squares
                return
            low, high, total, squares = np.inf, -np.inf, 0.0, 0.0
            for i in range(values.size):
                if np.isfinite(values[i]):
                    wide = np.float64(values[i])
                    low, high = min(low, wide), max(high, wide)
                    total += wide
                    squares += wide * wide
            out[0], out[1], out[2], out[3] = low, high, total, squares
        return call

    @numba.njit(error_model="numpy")
    def count_true(mask: Any) -> int:  # pragma: no cover - compiled
        """The number of nonzero bytes (XLA's booleans)."""
        n = 0
        for i in range(mask.size):
            n += np.int32(mask[i] != 0)
        return n

    @numba.njit(inline="always", error_model="numpy")
    def compact_rows(table: Any, width: int, index: Any, count: Any, shared_key: Any,
                     shared_count: Any, dropped: Any) -> None:  # pragma: no cover - compiled
        """``lrscope.jax.compact``'s form of the rows of ``table`` (flat, ``width`` wide)."""
        per_tensor, shared = index.size // (table.size // width), shared_key.size
        index[:] = -1
        count[:] = 0
        shared_key[:] = -1
        shared_count[:] = 0
        kept = lost = 0
        for row in range(table.size // width):
            slot = row * per_tensor
            for bucket in range(width):
                c = table[row * width + bucket]
                if c == 0:
                    continue
                if slot < (row + 1) * per_tensor:
                    index[slot], count[slot] = bucket, c
                    slot += 1
                elif kept < shared:
                    shared_key[kept], shared_count[kept] = row * width + bucket, c
                    kept += 1
                else:
                    lost += 1
        dropped[0] = lost

    def handler(dtype: Any) -> Any:
        reduce_values = count_and_reduce(dtype)

        @numba.cfunc(types.int64(types.int64), nopython=True, nogil=True)
        def call(frame: int) -> int:  # pragma: no cover - compiled
            if words(frame + FRAME_EXTENSION, 1)[0] != 0:  # XLA asks for the handler's metadata
                return call_metadata(frame)
            sources = words(words(frame + FRAME_ARGS, 1)[0], words(frame + FRAME_ARG_COUNT, 1)[0])
            n = element_count(sources[0])
            results = words(words(frame + FRAME_RETS, 1)[0], 3)
            counts, true = data(results[0], buckets, np.int32), data(results[2], 1, np.int32)
            counts[:] = 0
            reduce_values(counts, data(sources[0], n, dtype), data(results[1], 4, dtype))
            true[0] = count_true(data(sources[1], n, np.uint8)) if sources.size > 1 else 0
            return 0
        return call

    @numba.cfunc(types.int64(types.int64), nopython=True, nogil=True)
    def compact_call(frame: int) -> int:  # pragma: no cover - compiled
        if words(frame + FRAME_EXTENSION, 1)[0] != 0:
            return call_metadata(frame)
        table = words(words(frame + FRAME_ARGS, 1)[0], 1)[0]
        dims = words(words(table + BUFFER_DIMS, 1)[0], 2)
        n, width = dims[0], dims[1]
        results = words(words(frame + FRAME_RETS, 1)[0], 5)
        per_tensor = words(words(results[0] + BUFFER_DIMS, 1)[0], 2)[1]
        shared = words(words(results[2] + BUFFER_DIMS, 1)[0], 1)[0]
        compact_rows(data(table, n * width, np.int32), width,
                     data(results[0], n * per_tensor, np.int32), data(results[1], n * per_tensor, np.int32),
                     data(results[2], shared, np.int32), data(results[3], shared, np.int32),
                     data(results[4], 1, np.int32))
        return 0

    calls = {name: handler(dtype.type) for dtype, name in _TARGETS.items()}
    calls[_COMPACT] = compact_call
    for name, call in calls.items():
        register(name, call)
    return tuple(calls)


_HANDLERS: list[Any] = []


def bucket_stats(values: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The float32 bit bucket counts (int32) of ``values`` (float32 or float64, any shape),
    the min, max, sum and sum of squares of its finite elements, in its dtype (``inf``,
    ``-inf``, 0, 0 when none is finite), and the number of True elements of ``mask`` (a
    boolean array of the same size; int32, 0 without one).  Only where ``available()``."""
    _register()
    dtype = np.dtype(values.dtype)
    call = jax.ffi.ffi_call(_TARGETS[dtype], (
        jax.ShapeDtypeStruct((mapping.FLOAT32_BUCKETS,), jnp.int32), jax.ShapeDtypeStruct((4,), dtype),
        jax.ShapeDtypeStruct((), jnp.int32)), vmap_method="sequential")
    return call(values) if mask is None else call(values, jnp.broadcast_to(mask, values.shape))


def compact(table: jax.Array, per_tensor: int, shared: int) -> tuple[jax.Array, ...]:
    """``lrscope.jax.compact.compact`` of ``table`` (int32[n, width]), with room for
    ``per_tensor`` nonzero buckets per row and ``shared`` more: the index and count
    arrays, the shared keys and counts, and the number of nonzero buckets kept nowhere.
    Only where ``available()``."""
    _register()
    n = table.shape[0]
    rows, store = jax.ShapeDtypeStruct((n, per_tensor), jnp.int32), jax.ShapeDtypeStruct((shared,), jnp.int32)
    return jax.ffi.ffi_call(_COMPACT, (rows, rows, store, store, jax.ShapeDtypeStruct((), jnp.int32)),
                            vmap_method="sequential")(table)
