"""Whole-model reports across the ranks of ``torch.distributed``: rank 0 reports the model.

Every rank watches its own optimizer.  On a step with distributions each rank measures
only the elements it *counts* (``Ranks.counts``): its shards of a sharded tensor
(FSDP2's DTensors, with HSDP's and tensor parallelism's replicated mesh dimensions counted
at coordinate 0 only), the tensors its optimizer alone holds (``ZeroRedundancyOptimizer``'s
partition), its fragments of flat parameters (DeepSpeed ZeRO, ``lrscope.torch.deepspeed``;
FSDP1, ``fsdp1_fragments``), and a plain replicated tensor (DDP) on rank 0 only.  The ranks' parts add up
on rank 0 (``lrscope.merge``): bucket counts are those of the same run in one process, and
nothing is counted twice.

Communication: none on steps without distributions; on a measured step, on lrscope's own
gloo group (so that an NCCL job's streams are never touched), two all-reduces of float64
vectors (``lrscope.merge.PackedStep``): MIN over each distribution's min, max and span of
bucket keys, with a check that the ranks are at the same step, then SUM over counts, sums,
squared norms and bucket counts over those spans.  Their length depends on the number of
tensors and of buckets, not on the model's size.  The first measured step (and one at
which a rank reports a tensor new to the layout) first gathers the ranks' layouts.  A rank
that does not join makes the others' collective fail after ``timeout`` seconds, with an
error that names the cause instead of a hang.  When the monitors are made, a barrier
names the ranks that do not watch and the ranks check that each watches with the same
``every``.
"""

from __future__ import annotations

import datetime
import sys
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from lrscope.merge import Layout, PackedStep
from lrscope.report import StepReport
from lrscope.torch import deepspeed
from lrscope.torch.deepspeed import Fragment

#: Seconds lrscope's collectives wait for the other ranks before they raise (``Ranks``).
DEFAULT_TIMEOUT = 300.0


def active(setting: bool | None) -> bool:
    """Whether a monitor merges across ranks: ``distributed=None`` (the default) does when
    ``torch.distributed`` is initialised with more than one process; False never does (each
    rank reports its own tensors and shards); True requires an initialised group."""
    initialised = dist.is_available() and dist.is_initialized()
    if setting is None:
        return initialised and dist.get_world_size() > 1
    if setting and not initialised:
        raise RuntimeError("lrscope.watch(..., distributed=True) needs torch.distributed to be "
                           "initialised (torch.distributed.init_process_group) first")
    return bool(setting)


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _zero_type() -> type | None:
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def fsdp1_shard(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is FSDP1's (``FullyShardedDataParallel``) flat parameter or a view of
    one (``use_orig_params=True``): this rank's shard, as a plain tensor."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


def fsdp1_fragments(model: Any) -> Callable[[], dict[int, list[Fragment]]] | None:
    """For a model wrapped in FSDP1 units (``FullyShardedDataParallel``), a function giving
    ``{id(tensor the optimizer steps): [Fragment, ...]}``: each original parameter's elements
    in this rank's shard, under the unsharded model's name and with its whole shape; None for
    any other model.

    FSDP1 keeps this in each unit's ``FlatParameter``: ``_fqns`` and ``_shapes`` of the
    original parameters, and ``_shard_param_infos`` (``offset_in_shard``, ``numel_in_shard``
    in this rank's flat shard, padding left out).  The optimizer steps the flat shard itself,
    or with ``use_orig_params=True`` one 1-D view of it per original parameter
    (``_params``).  A rank counts its fragments unless they are copies: ``NO_SHARD`` (every
    rank holds everything: rank 0 counts) and the replicas of ``HYBRID_SHARD`` (the ranks of
    the first shard group count).
    """
    module = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    fsdp = getattr(module, "FullyShardedDataParallel", None)
    if fsdp is None or model is None or not callable(getattr(model, "named_modules", None)):
        return None
    units = [(name, unit) for name, unit in model.named_modules()
             if isinstance(unit, fsdp) and getattr(unit, "_handle", None) is not None]
    return partial(_fsdp1_fragments, units) if units else None


def _fsdp1_fragments(units: list[tuple[str, Any]]) -> dict[int, list[Fragment]]:
    out: dict[int, list[Fragment]] = {}
    for prefix, unit in units:
        flat = unit._handle.flat_param
        counted = _fsdp1_counts(unit)
        for index, (info, fqn, shape) in enumerate(zip(flat._shard_param_infos, flat._fqns, flat._shapes)):
            if not info.in_shard:
                continue
            name = f"{prefix}.{fqn}" if prefix else fqn
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            if flat._params is not None:  # use_orig_params=True: the view is the whole fragment
                view = flat._params[index]
                fragment = Fragment(view, 0, view.numel(), name, tuple(shape), counted)
            else:
                fragment = Fragment(flat, info.offset_in_shard, info.numel_in_shard, name, tuple(shape), counted)
            out.setdefault(id(fragment.param), []).append(fragment)
    return out


def _fsdp1_counts(unit: Any) -> bool:
    """Whether this rank counts the elements of its shard of an FSDP1 unit."""
    strategy = unit._handle._sharding_strategy.name
    if strategy == "NO_SHARD":
        return dist.get_rank() == 0
    if strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        return dist.get_rank(group=unit._inter_node_pg) == 0
    return True


def _is_zero_redundancy(optimizer: Any) -> bool:
    zero = _zero_type()
    return zero is not None and isinstance(optimizer, zero)


def partitioned(optimizer: Any) -> bool:
    """Whether ``optimizer`` holds this rank's partition of the parameters, each element in
    one rank's optimizer only (``ZeroRedundancyOptimizer``, DeepSpeed ZeRO)."""
    return _is_zero_redundancy(optimizer) or deepspeed.is_zero(optimizer)


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that steps this rank's parameters: ``ZeroRedundancyOptimizer``'s local
    ``optim`` (whose step hooks run inside the wrapper's step), else ``optimizer``."""
    return optimizer.optim if _is_zero_redundancy(optimizer) else optimizer


class Membership:
    """Which local elements this rank counts in a whole-model report (no communication)."""

    def __init__(self, partitioned: bool):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.partitioned = partitioned

    @classmethod
    def of(cls, optimizer: Any) -> Membership | None:
        """This rank's membership, or None outside a run of several processes."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        return cls(partitioned(optimizer))

    def counts(self, tensor: torch.Tensor) -> bool:
        """Whether this rank counts ``tensor``'s local elements in the whole-model report:
        a DTensor's shard where its replicated mesh dimensions are at coordinate 0, a tensor
        of this rank's partition, else (a replica, as under DDP) on rank 0 only."""
        if fsdp1_shard(tensor):  # this rank's own elements of a flat parameter (FSDP1 without
            return True          # model=: per-rank reports, which lrscope merge adds up)
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(tensor, dtensor):
            coordinate = tensor.device_mesh.get_coordinate()
            if coordinate is None:  # this rank holds no part of the mesh
                return False
            return all(c == 0 for c, p in zip(coordinate, tensor.placements) if not p.is_shard())
        return self.partitioned or self.rank == 0


class Ranks(Membership):
    """This process's place among the ranks, and the two all-reduces of a measured step."""

    def __init__(self, *, every: int, partitioned: bool, timeout: float | None = None):
        super().__init__(partitioned)
        self.timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT if timeout is None else timeout)
        self.layout = Layout()  # grown from the reports at the first measured step
        # Collective: every rank makes its monitor (lrscope.watch on every rank).
        self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        try:
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise self._absent("lrscope.watch", error) from error
        settings = [None] * self.world
        dist.all_gather_object(settings, {"every": every}, group=self.group)
        if len({s["every"] for s in settings}) > 1:
            raise ValueError("lrscope.watch: the ranks watch with different every= ("
                             + ", ".join(f"rank {i}: {s['every']}" for i, s in enumerate(settings))
                             + "); every rank must measure the same steps")

    def _absent(self, where: str, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"lrscope: at {where}, not every rank joined lrscope's collective within "
            f"{self.timeout.total_seconds():g} s ({error}). Every rank must call lrscope.watch on its "
            "optimizer with the same every=, and step it the same number of times; or pass "
            "distributed=False for per-rank reports")

    def _all_reduce(self, values: np.ndarray, op: Any, where: str) -> np.ndarray:
        tensor = torch.from_numpy(values)
        try:
            dist.all_reduce(tensor, op=op, group=self.group)
        except RuntimeError as error:
            raise self._absent(where, error) from error
        return tensor.numpy()

    def merge(self, report: StepReport, complete: bool = True) -> StepReport | None:
        """On rank 0, the whole model's report of this measured step; None on the others.
        ``complete``: whether this rank measured its part (its measurement may have failed);
        if a rank did not, the whole model's distributions are left out, with a note.

        Two all-reduces (``lrscope.merge.PackedStep``), and before them, at the first
        measured step or when a rank reports a tensor new to the layout, one gather of the
        ranks' layouts.  ValueError on every rank when the ranks are not at the same step."""
        where = f"step {report.t}"
        packed = PackedStep(report, self.layout, rank=self.rank, world=self.world, complete=complete)
        agreed = packed.agree(self._all_reduce(packed.extremes(), dist.ReduceOp.MIN, where))
        if agreed.missing:
            if self.rank == 0:
                for group in report.groups:
                    group.params, group.effective_lr, group.update_magnitude = {}, None, None
                    group.update_norm = group.param_norm = None
                report.notes.append(f"rank(s) {agreed.missing} could not measure their part: the "
                                    "whole model's distributions are left out")
            return report if self.rank == 0 else None
        if agreed.stale:
            layouts = [None] * self.world
            try:
                dist.all_gather_object(layouts, Layout.of(report), group=self.group)
            except RuntimeError as error:
                raise self._absent(where, error) from error
            self.layout = Layout.union([self.layout, *layouts])
            return self.merge(report, complete)
        sums = self._all_reduce(packed.sums(agreed), dist.ReduceOp.SUM, where)
        return packed.whole(sums, agreed) if self.rank == 0 else None
