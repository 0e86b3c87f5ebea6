"""Reading ``torch.optim`` state into the inputs of the family formulas.

The formulas (``lrscope.formulas``) take PyTorch's state names plus ``param`` and
``grad``; this module builds that view (complex tensors as real pairs, sparse gradients
densified with a mask of the touched entries), turns what torch.optim reads on the host
into Python floats, and records what a coming step overwrites.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from lrscope import formulas
from lrscope.formulas import Elementwise

#: Families whose torch implementation reads the step counter on the host even when capturable.
HOST_STEP = {"radam", "nadam", "asgd", "adagrad", "adafactor"}
#: Families whose formulas take beta1**t and beta2**t from the view when it has them.
BETA_POWERS = {"adam", "adamw", "adamax", "nadam"}
#: Families whose formula needs a value the step overwrites, recorded by the pre-hook.
RECORD_BEFORE = {"adadelta", "asgd", "adafactor"}
#: Of those, the families whose formula cannot do without it (ASGD falls back on the eta
#: its state holds; Adafactor recovers RMS(theta before) from theta after the step).
RECORD_REQUIRED = {"adadelta"}


def as_float(value: Any) -> float:
    """A Python float from a number or a one-element tensor (a host read for a device one)."""
    return float(value.item() if isinstance(value, torch.Tensor) else value)


#: Types no DTensor has (a DTensor parameter keeps its own type: ``nn.Parameter`` marks it).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's ``fully_shard``, tensor parallelism).  Only
    once its module is imported can a tensor be one (``torch.distributed.tensor``; before
    torch 2.5, ``torch.distributed._tensor``)."""
    if type(tensor) in _PLAIN:  # (the usual case, asked for every tensor of every measurement)
        return False
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(name), "DTensor", None)
        if dtensor is not None and isinstance(tensor, dtensor):
            return True
    return False


def local(tensor: Any) -> Any:
    """This rank's shard of a DTensor (its elements, as the optimizer updates them), any
    other value as it is.  Reading the shard needs no communication, so a monitor on one
    rank alone cannot hang waiting for the others."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def canonical(tensor: Any) -> Any:
    """This rank's shard (``local``), and complex tensors as (..., 2) real views:
    torch.optim treats re and im separately."""
    tensor = local(tensor)
    if isinstance(tensor, torch.Tensor) and tensor.is_complex():
        return torch.view_as_real(tensor)
    return tensor


def state_view(state: dict[str, Any], param: torch.Tensor,
               recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The formula inputs of one parameter: its state (``step`` aside), ``param``, ``grad``
    and what the pre-hook ``recorded``."""
    # SGD's momentum buffer of a sparse gradient is sparse (the rows seen so far), and the
    # step adds all of it: dense, its duplicate entries summed as the step sums them.
    view = {k: canonical(v.to_dense() if isinstance(v, torch.Tensor) and v.is_sparse else v)
            for k, v in state.items() if k != "step"}
    grad = param.grad
    if grad is not None and grad.is_sparse:
        grad = grad.coalesce()
        # The indices come from a coalesced torch tensor: the invariants hold.
        ones = torch.sparse_coo_tensor(grad.indices(), torch.ones_like(grad.values()), grad.shape,
                                       check_invariants=False, is_coalesced=True)
        view["touched"] = ones.to_dense() != 0
        grad = grad.to_dense()
    view.update(param=canonical(param.detach()), grad=canonical(grad))
    view.update(recorded or {})
    return view


def elementwise_of(family: str, state: dict[str, Any], param: torch.Tensor, h: dict[str, Any],
                   recorded: dict[str, Any] | None = None) -> Elementwise:
    """eta and d of ``param``'s last step from its optimizer state."""
    view, t = host_scalars(family, state_view(state, param, recorded), state.get("step", 0), h)
    return apply_formula(family, view, t, h, param.dtype)


def host_scalars(family: str, view: dict[str, Any], t: Any,
                 h: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The step counter (and what depends on it alone) as Python floats where torch.optim
    reads it on the host: always on the CPU, and for some families even when capturable.

    The powers beta**t (Adam, Adamax, NAdam) and NAdam's two coefficients are computed
    here once, in float64 as torch.optim does, rather than inside the formula.
    """
    # As torch.optim does unless capturable: bias corrections in Python floats.  A float
    # is left alone: converting it again would make a compiled caller specialise on it.
    if isinstance(t, torch.Tensor):
        if t.device.type == "cpu" or family in HOST_STEP:
            t = as_float(t)
    elif not isinstance(t, float):
        t = float(t)
    if family == "nadam" and isinstance(view.get("mu_product"), torch.Tensor):
        view = {**view, "mu_product": as_float(view["mu_product"])}
    if family in BETA_POWERS and isinstance(t, float) and "beta1_power" not in view:
        view = {**view, "beta1_power": h["beta1"] ** t, "beta2_power": h["beta2"] ** t}
    if family == "nadam" and isinstance(t, float):
        c_m, c_g = formulas.family("nadam").coefficients(t, h, "torch", view.get("mu_product"))
        view = {**view, "c_m": c_m, "c_g": c_g}
    return view, t


def apply_formula(family: str, view: dict[str, Any], t: Any, h: dict[str, Any],
                  dtype: torch.dtype) -> Elementwise:
    """The family's formula on a state view (``state_view``), or a flat chunk of one, and
    a step already passed through ``host_scalars`` (their scalars may then be 0-d tensors:
    inputs of a compiled caller)."""
    module = formulas.family(family)
    if family == "sparse_adam":
        # SparseAdam adds eps to the raw sqrt(v), like TF1, and moves only the entries in
        # the sparse gradient: eta is 0 elsewhere.
        el = module.elementwise(torch, view, t, {**h, "amsgrad": False}, "tf1")
        el.eta = el.eta * view["touched"]
        return el
    if family == "adafactor":
        eps1, eps2 = h["eps"]
        h = {**h, "eps": (torch.finfo(dtype).eps if eps1 is None else eps1, eps2)}
    return module.elementwise(torch, view, t, h, "torch")


def record_before(family: str, state: dict[str, Any] | None, param: torch.Tensor,
                  group: dict[str, Any]) -> dict[str, Any]:
    """What the coming step overwrites (or its initial value on the first step), of this
    rank's shard of a DTensor (``local``)."""
    state = state or {}
    param = local(param)
    if family == "adadelta":
        before = state["acc_delta"].clone() if "acc_delta" in state else torch.zeros_like(param)
        return {"acc_delta_before": canonical(before)}
    if family == "adafactor":
        return {"param_rms_before": param.detach().norm().item() / max(param.numel(), 1) ** 0.5}
    # ASGD: torch reads eta as a Python float; it starts as lr in torch's scalar dtype.
    if "eta" in state:
        return {"eta_before": state["eta"].clone().double()}
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return {"eta_before": torch.as_tensor(as_float(group["lr"]), dtype=scalar_dtype).double()}
