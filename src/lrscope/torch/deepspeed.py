"""DeepSpeed ZeRO (stages 1-3): the model's tensors inside the flat fp32 partitions.

DeepSpeed flattens each param group and gives every rank a contiguous partition of it; the
torch optimizer it wraps (``zero_optimizer.optimizer``) steps one flat fp32 tensor per group,
whose state ignores the parameters' boundaries.  Each model parameter's elements on this
rank are a *fragment* of that flat tensor:

* stages 1 and 2: ``param._hp_mapping.hp_fragment_address`` (start, numel) in the flat
  partition of ``param._hp_mapping.param_group_index`` (None where the rank holds none of it);
* stage 3: ``grad_position[param_id] = (sub group, offset, partition numel)`` in
  ``fp32_partitioned_groups_flat``; the last rank's partition ends in padding, left out.

lrscope reads those fragments of the state (no copy, no communication) and reports each
parameter under its model name; the fragments of one parameter on the ranks are disjoint,
so rank 0's merge (``lrscope.torch.distributed``) adds them up to the whole tensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Fragment:
    """The elements of one model parameter in a flat tensor that an optimizer steps:
    ``numel`` from ``start`` (DeepSpeed's partitions; FSDP1's flat parameters and the views
    of ``use_orig_params=True``, ``lrscope.torch.distributed.fsdp1_fragments``)."""

    param: torch.Tensor  # DeepSpeed: the model's parameter, which names it; FSDP1: the flat tensor
    start: int
    numel: int
    name: str | None = None  # the parameter's name where no tensor of its own names it (FSDP1)
    whole_shape: tuple[int, ...] | None = None
    counted: bool = True  # whether this rank counts it in a whole-model report (else a replica)

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's whole shape (a ZeRO-3 parameter keeps it in ``ds_shape``)."""
        if self.whole_shape is not None:
            return self.whole_shape
        return tuple(getattr(self.param, "ds_shape", None) or self.param.shape)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.narrow(0, self.start, self.numel)


def _types() -> tuple[type, ...]:
    found = []
    for module, name in (("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
                         ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a ``DeepSpeedEngine`` (its module holds the model's names)."""
    cls = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    return cls is not None and isinstance(model, cls)


def model_groups(zero: Any) -> list[list[torch.Tensor]]:
    """The model's parameters by param group, as every rank holds them (names by position)."""
    return [list(group) for group in (zero.fp16_groups if hasattr(zero, "fp16_groups") else zero.bit16_groups)]


def is_zero(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a DeepSpeed ZeRO optimizer (``engine.optimizer``)."""
    types = _types()
    return bool(types) and isinstance(optimizer, types)


def fragments(zero: Any) -> dict[int, list[Fragment]]:
    """``{id(flat fp32 tensor): [Fragment, ...]}``: the model parameters' elements on this rank
    in each flat tensor the wrapped torch optimizer steps."""
    out: dict[int, list[Fragment]] = {}
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3
        rank = torch.distributed.get_rank(group=getattr(zero, "dp_process_group", None))
        for group in zero.fp16_groups:
            for param in group:
                sub, offset, partition = zero.grad_position[zero.get_param_id(param)]
                numel = min(partition, max(0, param.ds_numel - rank * partition))
                flat = zero.fp32_partitioned_groups_flat[sub]
                out.setdefault(id(flat), []).append(Fragment(param, int(offset), int(numel)))
        return out
    for index, group in enumerate(zero.bit16_groups):  # stages 1 and 2
        flat = zero.single_partition_of_fp32_groups[index]
        for param in group:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                address = mapping.hp_fragment_address
                out.setdefault(id(flat), []).append(Fragment(param, int(address.start), int(address.numel)))
    return out


def fragment_state(state: dict[str, Any], flat: torch.Tensor, fragment: Fragment) -> dict[str, Any]:
    """The optimizer state of ``fragment``: its narrow view of each per-element entry."""
    return {key: fragment.view(value) if isinstance(value, torch.Tensor) and value.shape == flat.shape
            else value for key, value in state.items()}
