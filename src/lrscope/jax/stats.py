"""Per-tensor statistics of one optax step, computed inside ``jit``, and their decoding.

Everything here is traced with ``jax.numpy`` and runs where the arrays live (sharded
arrays included): float32 bit buckets of eta counted with ``bincount`` (on a single CPU
device, with their extremes and sums, by ``lrscope.jax.kernel``), exact finite
min/max/sum/sum of squares, the eps-dominated count, the update and parameter squared
norms, and the model check (max |modelled - real update|).  On a single CPU device,
without the check, ``compiled_leaf_stats`` takes them all in one pass instead
(``lrscope.jax.fused``).  ``param_report`` decodes
one tensor's host copy into a ParamReport; ``measured_if_refuted`` replaces a group's
statistics of eta by those of the realized update where the check refutes the model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrscope.jax import fused, kernel
from lrscope.report import Distribution, ParamReport
from lrscope.stats import LogSketch, mapping


class LeafStats(NamedTuple):
    """Statistics of one tensor for one step, as device arrays (``stack_stats``: of several,
    one row per tensor along a leading axis)."""

    buckets: jax.Array  # int32[FLOAT32_BUCKETS] counts of eta (of |delta| when measured)
    min: jax.Array
    max: jax.Array
    sum: jax.Array
    sum_squares: jax.Array
    eps_dominated: jax.Array  # int32, -1 where the family has no eps
    update_sq: jax.Array
    param_sq: jax.Array  # NaN when update() got no params
    model_residual: jax.Array  # max |modelled - real update| (NaN without the model check)
    update_max: jax.Array  # max |real update| (NaN without the model check)
    measured: jax.Array  # bool: the statistics are of |real update|, not of eta (measured-only)


def stat_dtype() -> Any:
    """float64 under ``jax_enable_x64``, else float32."""
    return jnp.result_type(float)


def _buckets(values: jax.Array) -> jax.Array:
    """Counts of the float32 bit buckets of ``values`` (see ``stats.mapping``): the bits
    shifted as unsigned integers leave sign, exponent and top mantissa bits."""
    bits = jax.lax.bitcast_convert_type(values.reshape(-1).astype(jnp.float32), jnp.uint32)
    index = (bits >> mapping.FLOAT32_SHIFT).astype(jnp.int32)
    return jnp.bincount(index, length=mapping.FLOAT32_BUCKETS).astype(jnp.int32)


_COMBINE = {"min": jnp.minimum, "max": jnp.maximum, "sum": jnp.add}


def _reduce(columns: dict[str, tuple[jax.Array, str]]) -> dict[str, jax.Array]:
    """Several reductions of same-sized arrays in one pass (an XLA variadic reduce): for
    the masked statistics of values that are not all finite (``_finite_stats``)."""
    names = list(columns)
    operands = tuple(columns[n][0].reshape(-1) for n in names)
    kinds = [columns[n][1] for n in names]
    start = {"min": jnp.inf, "max": -jnp.inf, "sum": 0}
    inits = tuple(jnp.asarray(start[k], x.dtype) for k, x in zip(kinds, operands))

    def combine(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(_COMBINE[k](x, y) for k, x, y in zip(kinds, a, b))

    return dict(zip(names, jax.lax.reduce(operands, inits, combine, (0,))))


def _finite_stats(wide: jax.Array) -> tuple[jax.Array, ...]:
    """min, max, sum and sum of squares of the finite elements of ``wide``.

    XLA:CPU vectorises a plain float reduction, but not one that holds a comparison or a
    select (a mask, an integer count, a variadic reduce): those cost several times more
    per element (40 tensors of 250K float32 elements, CPU time: 3 ms for ``x.min()``,
    30 ms for the min of ``where(isfinite(x), x, inf)``).  So the plain reductions are
    taken first; their sum is finite exactly when every element is finite (and the
    sum does not overflow), and then they are the finite ones.  Otherwise (a NaN, an
    infinity, an overflowing sum) the masked reductions are taken instead, under
    ``lax.cond``: only on the steps that need them.  Elsewhere the masked ones are taken
    (a GPU runs them at memory speed, and its runtime may read a conditional's predicate
    on the host).
    """
    plain = (wide.min(), wide.max(), wide.sum(), (wide * wide).sum())

    def masked() -> tuple[jax.Array, ...]:
        finite = jnp.isfinite(wide)
        kept = jnp.where(finite, wide, jnp.zeros((), wide.dtype))
        r = _reduce({"min": (jnp.where(finite, wide, jnp.inf), "min"),
                     "max": (jnp.where(finite, wide, -jnp.inf), "max"),
                     "sum": (kept, "sum"), "sum_squares": (kept * kept, "sum")})
        return r["min"], r["max"], r["sum"], r["sum_squares"]

    return jax.lax.platform_dependent(
        cpu=lambda: jax.lax.cond(jnp.isfinite(plain[2]), lambda: plain, masked), default=masked)


def _distribution(values: jax.Array, wide: jax.Array, dominated: jax.Array | None
                  ) -> tuple[jax.Array, ...]:
    """The bucket counts of ``values``, the finite min, max, sum and sum of squares of
    ``wide`` (``values`` in the statistics' dtype, so both have the same float32 buckets)
    and the eps-dominated count (-1 without ``dominated``).

    On a single CPU device with numba installed, ``lrscope.jax.kernel`` takes them in one
    compiled pass; elsewhere (sharded arrays included) a scatter-add and XLA's reductions.
    """
    none = jnp.asarray(-1, jnp.int32)

    def traced() -> tuple[jax.Array, ...]:
        return (_buckets(values), *_finite_stats(wide), none if dominated is None else _count(dominated))

    if not kernel.available():
        return traced()

    def compiled() -> tuple[jax.Array, ...]:
        counts, reduced, count = kernel.bucket_stats(wide, dominated)
        return (counts, *reduced, none if dominated is None else count)

    return jax.lax.platform_dependent(cpu=compiled, default=traced)


def _count(mask: jax.Array) -> jax.Array:
    """The number of True elements of ``mask``, int32, exactly.

    Summed as floats (XLA:CPU vectorises it, not an integer sum): every partial sum of
    zeros and ones is an integer no larger than the elements summed, exact in float32
    up to 2**24 of them.  A larger tensor is summed along its last axis first (when that
    axis is within the limit), its partial counts as integers.
    """
    exact = 1 << (53 if stat_dtype() == jnp.float64 else 24)
    ones = jnp.where(mask, 1.0, 0.0).astype(stat_dtype())
    if mask.size <= exact:
        return ones.sum().astype(jnp.int32)
    if mask.ndim > 1 and mask.shape[-1] <= exact:
        return ones.sum(-1).astype(jnp.int32).sum()
    return mask.sum(dtype=jnp.int32)


def leaf_stats(family: Any, arrays: dict[str, Any], t: Any, h: dict[str, Any], grad: Any,
               real: Any, after: Any, check: bool, convention: str = "optax"
               ) -> tuple[LeafStats, dict[str, Any]]:
    """Statistics of one tensor, and its eta/d/decay arrays (for ``keep_arrays``).

    ``family`` is the formula module (None: measured-only, |real update| is sketched),
    ``arrays`` the optimizer state in PyTorch names, ``real`` the update optax emitted
    (None when not needed), ``after`` theta after the step (None when update() got no
    params), ``check`` whether to compare the model with ``real`` and ``convention`` the
    formula's (``lrscope.keras.backend_jax`` measures Keras steps with it).  Without the check
    the norms come from the model (SPEC §1's identity).

    Theta before the step is ``after - real`` when ``real`` is given, else it follows
    from the identity ``after = before - eta * d - decay_rate * before``: either way
    within a rounding of theta of the value the step read.  XLA computes eta, writes it
    out, and counts and reduces it (``compiled_leaf_stats`` takes one pass instead).
    """
    f = stat_dtype()
    nan = jnp.asarray(jnp.nan, f)
    dominated, modelled, kept = None, None, {}
    if family is None:
        values, update = jnp.abs(real), real
    else:
        state = _state(arrays, grad, real, after)
        el, modelled = _modelled(family, state, t, h, convention)
        values = jnp.broadcast_to(el.eta, grad.shape)
        direction = jnp.broadcast_to(el.direction, grad.shape)
        modelled = jnp.broadcast_to(modelled, grad.shape)
        if el.eps_dominated is not None:
            dominated = jnp.broadcast_to(el.eps_dominated, grad.shape)
        update = real if check else modelled
        kept = {"eta": values.astype(f), "direction": direction.astype(jnp.result_type(grad, f)),
                "decay_rate": jnp.asarray(el.decay_rate, f)}
    wide = values.astype(f)
    size = jnp.abs(update).astype(f)
    checked = modelled is not None and check
    stats = LeafStats(
        *_distribution(values, wide, dominated), (size * size).sum(),
        nan if after is None else (jnp.abs(after).astype(f) ** 2).sum(),
        jnp.abs(modelled - real).astype(f).max() if checked else nan,
        size.max() if checked else nan, jnp.asarray(family is None))
    return stats, kept


def _state(arrays: dict[str, Any], grad: Any, real: Any, after: Any) -> dict[str, Any]:
    """The formula's view of one tensor: the optimizer state, ``grad``, theta after the
    step (``param``) and before it (``param_before``, where ``real`` is known)."""
    state = {**arrays, "grad": grad}
    if after is not None:
        state["param"] = after
        if real is not None:
            state["param_before"] = (after - real).astype(after.dtype)
    return state


def _modelled(family: Any, state: dict[str, Any], t: Any, h: dict[str, Any],
              convention: str) -> tuple[Any, Any]:
    """The family's Elementwise of the step and its modelled update ``-eta * d - decay_rate
    * theta_before`` (theta before from ``param_before``, else from theta after and SPEC
    §1's identity; schedule-free: its own ``delta``)."""
    el = family.elementwise(jnp, state, t, h, convention)
    if el.delta is not None:  # eta and d describe another sequence (schedule-free's z)
        return el, el.delta
    if "param_before" in state:
        return el, -el.eta * el.direction - el.decay_rate * state["param_before"]
    if "param" in state:
        return el, el.update(state["param"])
    return el, -el.eta * el.direction


def compiled_leaf_stats(family: Any, arrays: dict[str, Any], t: Any, h: dict[str, Any], grad: Any,
                        real: Any, after: Any, convention: str = "optax", keep: int | None = None
                        ) -> LeafStats:
    """``leaf_stats`` without the model check from one compiled pass (``fused.statistics``),
    on a single CPU device: the formula traced on the tensor's arrays, the per-step values
    (``t`` and the arrays among the hyperparameters) as its scalars.  With ``keep``,
    its ``buckets`` are ``fused.statistics``' ``(index, count, more)``.  Raises
    ``fused.Unsupported`` where it does not apply: a measured-only group, no ``after``,
    an empty tensor, no compiled statistics here (``kernel.available``), a formula that
    does not translate."""
    if family is None or after is None or not grad.size or not kernel.available():
        raise fused.Unsupported("the XLA path measures this tensor")
    elements = {"grad": grad, "param": after, **({} if real is None else {"real": real})}
    scalars = {"t": t}
    for key, value in arrays.items():
        target = elements if np.shape(value) == grad.shape else scalars
        if np.ndim(value) and target is scalars:
            raise fused.Unsupported(f"{key} has another shape than the parameter")
        target[f"state.{key}"] = value
    leaves, tree = jax.tree_util.tree_flatten(h)
    traced_index = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    scalars.update({f"h{i}": leaves[i] for i in traced_index})

    def formula(elements: dict[str, Any], scalars: dict[str, Any]) -> tuple[Any, ...]:
        view = {**{k[6:]: v for k, v in elements.items() if k.startswith("state.")},
                **{k[6:]: v for k, v in scalars.items() if k.startswith("state.")}}
        state = _state(view, elements["grad"], elements.get("real"), elements["param"])
        hyper = jax.tree_util.tree_unflatten(tree, [scalars.get(f"h{i}", x) for i, x in enumerate(leaves)])
        el, modelled = _modelled(family, state, scalars["t"], hyper, convention)
        return el.eta, modelled, state["param"], el.eps_dominated

    counts, s, dominated = fused.statistics(formula, elements, scalars, keep)
    nan = jnp.asarray(jnp.nan, stat_dtype())
    return LeafStats(counts, *s[:4], dominated, s[4], s[5], nan, nan, jnp.asarray(False))


def merge_stats(s: LeafStats) -> LeafStats:
    """The statistics of the union of stacked tensors (a group, with ``per_param=False``),
    as a stack of one row."""
    eps = s.eps_dominated
    merged = LeafStats(
        s.buckets.sum(0, dtype=jnp.int32), s.min.min(), s.max.max(), s.sum.sum(), s.sum_squares.sum(),
        jnp.where(jnp.all(eps < 0), -1, jnp.maximum(eps, 0).sum()).astype(jnp.int32),
        s.update_sq.sum(), s.param_sq.sum(), s.model_residual.max(), s.update_max.max(),
        s.measured.any())
    return LeafStats(*(field[None] for field in merged))


def stack_stats(stats: list[LeafStats]) -> LeafStats:
    """The statistics of several tensors as one LeafStats, a row per tensor: the state then
    holds ten arrays per group rather than ten per tensor (on every step between
    distributions each array is carried over, a copy or a kernel launch of its own)."""
    return jax.tree_util.tree_map(lambda *rows: jnp.stack(rows), *stats)


#: On the CPU a group's tensors are measured in blocks of consecutive tensors of at most
#: this many elements together (a larger tensor is a block of its own), one block at a
#: time (``by_blocks``).
BLOCK_ELEMENTS = 1 << 20


def blocks(sizes: list[int], limit: int) -> list[list[int]]:
    """The indices of ``sizes`` in blocks of consecutive ones with at most ``limit``
    elements together (a larger one alone).

    >>> blocks([3, 3, 5, 1, 9], limit=6)
    [[0, 1], [2, 3], [4]]
    """
    out: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if out[-1] and total + n > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def by_blocks(measures: list[Callable[[], LeafStats]], sizes: list[int]) -> LeafStats:
    """The statistics of several tensors (``sizes`` elements each), stacked (a row per tensor).

    On the CPU they are measured one block (``blocks``) at a time, by a loop whose body runs
    the j-th block's measurements under ``lax.switch``: the branches of a switch share
    their buffers, so XLA holds the temporaries (eta, the bucket keys) of one block at a
    time.  Written out one after the other, the measurements are independent, and XLA's
    CPU scheduler runs them side by side with every tensor's temporaries allocated at
    once, on every step, distributions or not (40 tensors of 250K, blocks of four:
    15 MiB instead of 83 MiB; a step with distributions page-faulted 1,280 times instead
    of 21,056 and took 41 ms instead of 40-58 ms in alternated runs).  A branch per block
    rather than per tensor: XLA's compile time grows with the branches (200 small
    tensors, a branch each: 15 s to compile the step instead of 5.5 s).
    Elsewhere the measurements stay written out: a GPU's memory scheduler orders them for
    memory (not measured here), and XLA's GPU runtime may read a switch's index on the
    host, a synchronisation per block.
    """
    def written_out() -> LeafStats:
        return stack_stats([measure() for measure in measures])

    spans = blocks(sizes, BLOCK_ELEMENTS)
    if len(spans) == 1:
        return written_out()
    width = max(map(len, spans))

    def measure_block(block: list[int]) -> LeafStats:
        rows = [measures[i]() for i in block]
        return stack_stats(rows + rows[:1] * (width - len(rows)))  # padded to ``width`` rows

    def in_a_loop() -> LeafStats:
        def measure_into(j: jax.Array, table: LeafStats) -> LeafStats:
            block = jax.lax.switch(j, [functools.partial(measure_block, span) for span in spans])
            return LeafStats(*(field.at[j].set(rows) for field, rows in zip(table, block)))

        empty = LeafStats(*(field.reshape(len(spans), width, *field.shape[1:])
                            for field in empty_stats(len(spans) * width)))
        table = jax.lax.fori_loop(0, len(spans), measure_into, empty)
        not_padding = np.array([j * width + k for j, block in enumerate(spans) for k in range(len(block))])
        return LeafStats(*(field.reshape(-1, *field.shape[2:])[not_padding] for field in table))

    return jax.lax.platform_dependent(cpu=in_a_loop, default=written_out)


def compiled_or_blocks(compiled: list[Callable[[int | None], LeafStats]],
                       traced: list[Callable[[], LeafStats]], sizes: list[int]) -> LeafStats:
    """The statistics of a group's tensors, stacked: from one compiled pass each
    (``compiled[i](None)``, a ``compiled_leaf_stats`` with every bucket's count) where
    every tensor's formula compiles, else ``by_blocks(traced, sizes)``."""
    try:
        return stack_stats([measure(None) for measure in compiled])
    except fused.Unsupported:
        return by_blocks(traced, sizes)


def measured_if_refuted(stats: LeafStats, measure: Callable[[], LeafStats],
                        tolerance: float) -> LeafStats:
    """A group's statistics of eta (``stats``, stacked), or, where the model check refutes
    the model, those of the realized update (``measure()``), keeping the check's residuals
    and largest |real update|.

    The check refutes the model when the largest |modelled - real update| of the group
    exceeds ``tolerance`` times its largest |real update| (a NaN refutes it too): the
    group's ``model_error`` is above its tolerance.  The choice is made inside ``jit``
    (``lax.cond``), so the realized update is sketched on the steps that need it only and
    the state holds one set of statistics either way.
    """
    refuted = ~(stats.model_residual.max() <= tolerance * stats.update_max.max())
    return jax.lax.cond(refuted, lambda: measure()._replace(
        model_residual=stats.model_residual, update_max=stats.update_max), lambda: stats)


def unstack_stats(stats: LeafStats) -> list[LeafStats]:
    """The per-tensor rows of a (host copy of a) ``stack_stats`` result."""
    return [LeafStats(*(field[i] for field in stats)) for i in range(len(stats.min))]


def empty_stats(n: int) -> LeafStats:
    """Placeholder statistics of ``n`` tensors, stacked (the state before any step)."""
    nan = jnp.full((n,), jnp.nan, stat_dtype())
    return LeafStats(jnp.zeros((n, mapping.FLOAT32_BUCKETS), jnp.int32), nan, nan, nan, nan,
                     jnp.full((n,), -1, jnp.int32), nan, nan, nan, nan, jnp.zeros((n,), bool))


def decode(s: LeafStats) -> tuple[Distribution, float, float | None]:
    """The Distribution (no eps-dominated count where the family has no eps), the update
    norm and the parameter norm (None when update() got no params) of one tensor from the
    host copy of its LeafStats."""
    sketch = LogSketch.from_float32_buckets(
        np.asarray(s.buckets), min=float(s.min), max=float(s.max), sum=float(s.sum),
        sum_squares=float(s.sum_squares))
    eps = None if int(s.eps_dominated) < 0 else int(s.eps_dominated)
    param_sq = float(s.param_sq)
    return (Distribution(sketch, eps), math.sqrt(float(s.update_sq)),
            None if math.isnan(param_sq) else math.sqrt(param_sq))


def param_report(name: str, shape: tuple[int, ...], s: LeafStats) -> ParamReport:
    """ParamReport of one tensor from the host copy of its LeafStats: an effective-lr
    distribution, or an update-magnitude one where the statistics are measured."""
    dist, update_norm, param_norm = decode(s)
    measured = bool(s.measured)
    return ParamReport(name=name, shape=shape, effective_lr=None if measured else dist,
                       update_magnitude=Distribution(dist.sketch) if measured else None,
                       update_norm=update_norm, param_norm=param_norm)
