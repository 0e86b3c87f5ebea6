"""Check a model against the optimizer's real step: SPEC §5's identity as a helper that an
optimizer's author (or a user who called ``lrscope.register``) runs in their own tests.

``check_identity(make_optimizer)`` builds parameters of a few shapes, runs real steps with
random gradients (one parameter without a gradient on one step), copies the parameters
before each step, and asserts for every parameter that moved::

    theta_after - theta_before == -eta * d - decay_rate * theta_before

(for a family with ``IDENTITY_STATE``, that state entry's change, schedule-free's z), and
that the update lrscope reconstructs without the copy (``Elementwise.update``, which the
update norms use) is the realized one, within a few units of rounding of the dtype.  It
also checks that the report models the optimizer: no option left unmodelled, a finite
step size.  PyTorch only for now; importing this module imports no framework.

>>> import torch, lrscope.testing
>>> reports = lrscope.testing.check_identity(lambda params: torch.optim.AdamW(params, lr=0.01))
>>> reports[-1].t, reports[-1].family
(4, 'adamw')
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["check_identity"]


def check_identity(
    make_optimizer: Callable[[list[Any]], Any],
    *,
    shapes: Sequence[tuple[int, ...]] = ((4, 3), (5,), ()),
    steps: int = 4,
    dtype: Any = "float64",
    scheduler: Callable[[Any], Any] | None = None,
    direction_is_gradient: bool = False,
    relative: float | None = None,
    seed: int = 0,
    before_step: Callable[[Any, int], None] | None = None,
    gradient: Callable[[Any, Any], Any] | None = None,
) -> list[Any]:
    """Run ``steps`` real steps of ``make_optimizer(params)`` and assert the identity (see
    the module docstring) for every parameter and step; return the monitor's reports.

    ``dtype``: ``"float64"``/``"float32"`` or a torch dtype.  ``scheduler(optimizer)``
    builds a scheduler stepped after every step (its lr must not leak into the report of
    the step before).  ``direction_is_gradient``: also assert that ``d`` is the gradient
    the step was given (families whose d is the raw gradient).  ``relative``: the
    tolerance relative to the step's largest change (default 1e-12 in float64, 1e-5 in
    float32), besides four units of rounding of the largest value.  ``before_step(optimizer,
    step)`` runs before each step (a ``train()`` call, a change of options).
    ``gradient(param, noise)`` gives a parameter's gradient from its value and standard
    normal ``noise`` (default: the noise times 1 to 3; ``lambda p, noise: p + noise``
    descends a quadratic, where adaptive step sizes such as Prodigy's ``d`` grow).
    """
    import torch

    import lrscope
    from lrscope import formulas
    from lrscope.torch.reader import TorchReader

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]
    optimizer = make_optimizer(params)
    reader = TorchReader(optimizer)
    if reader.family is None:
        raise AssertionError(reader.notes[0])
    identity_key = getattr(formulas.family(reader.family), "IDENTITY_STATE", None)
    schedule = scheduler(optimizer) if scheduler is not None else None
    ulp = torch.finfo(dtype).eps
    relative = relative if relative is not None else (1e-12 if dtype == torch.float64 else 1e-5)
    names = {id(p): f"param{i}" for i, p in enumerate(params)}
    reports = []
    try:
        monitor = lrscope.watch(optimizer, findings=False)  # a check of the model, not of a run
    except TypeError:
        monitor = lrscope.watch(optimizer)
    with monitor:
        for step in range(1, steps + 1):
            for i, p in enumerate(params):
                skip = len(params) > 1 and i == 1 and step == 3  # a tensor without gradient once
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
                value = noise * (1 + step % 3) if gradient is None else gradient(p.detach(), noise)
                p.grad = None if skip else value.to(dtype)
            given = {id(p): p.grad.clone() for p in params if p.grad is not None}
            if before_step is not None:
                before_step(optimizer, step)
            theta = {id(p): p.detach().clone() for p in params}
            tracked = {id(p): _tracked(optimizer, p, identity_key).clone() for p in params}
            pending = reader.begin(step, distributions=True)
            optimizer.step()
            report = monitor.last
            moved = {id(p): p for p in params if p.grad is not None}
            for p in params:
                if id(p) not in moved:
                    assert torch.equal(p.detach(), theta[id(p)]), f"{names[id(p)]} moved without a gradient"
            by_name = {names[i]: p for i, p in moved.items()}
            checked = 0
            for name, el in reader.elementwise(pending):
                p = by_name[name]
                before = theta[id(p)]
                realized = _tracked(optimizer, p, identity_key) - tracked[id(p)]
                predicted = -el.eta * el.direction - el.decay_rate * before
                scale = max(before.abs().max().item(), tracked[id(p)].abs().max().item(), 1e-300)
                where = f"step {step} {name}"
                _close(realized, predicted, 4 * ulp * scale, relative, f"{where}: delta != -eta * d - decay")
                _close(p.detach() - before, el.update(p.detach()), 8 * ulp * scale, relative,
                       f"{where}: the update reconstructed without a copy")
                _reported(report, name, el.eta, p.detach() - before, relative, 4 * ulp * scale)
                if direction_is_gradient:
                    _close(torch.as_tensor(el.direction), given[id(p)], 8 * ulp * given[id(p)].abs().max().item(),
                           relative, f"{where}: d is not the gradient given")
                checked += 1
            assert checked == len(moved), f"step {step}: {checked} of {len(moved)} parameters modelled"
            unmodelled = [n for n in report.notes if "not modelled" in n or "unknown" in n]
            assert not unmodelled, f"step {step}: {unmodelled}"
            for group in report.groups:
                assert group.step_size == group.step_size, f"step {step}: step size NaN"
            reports.append(report)
            if schedule is not None:
                schedule.step()
    return reports


def _reported(report: Any, name: str, eta: Any, realized: Any, relative: float, rounding: float) -> None:
    """The monitor's distribution of ``name`` describes ``eta`` (count, exact extremes) and
    its update norm is the realized change's, up to ``rounding`` per element (the realized
    change of a float32 parameter is rounded to the parameter's units)."""
    import torch

    param = next(g.params[name] for g in report.groups if name in g.params)
    eta = torch.as_tensor(eta).double().expand(realized.shape)
    dist = param.effective_lr
    assert dist is not None, f"{name}: no effective-lr distribution in the report"
    assert dist.count == eta.numel(), f"{name}: {dist.count} values of eta reported, not {eta.numel()}"
    for got, exact in ((dist.min, eta.min().item()), (dist.max, eta.max().item())):
        assert abs(got - exact) <= 1e-6 * abs(exact), f"{name}: reported eta extreme {got} != {exact}"
    norm = realized.double().norm().item()
    tolerance = max(relative, 1e-6) * norm + rounding * realized.numel() ** 0.5 + 1e-300
    assert param.update_norm is not None and abs(param.update_norm - norm) <= tolerance, (
        f"{name}: reported update norm {param.update_norm} != {norm}")


def _tracked(optimizer: Any, p: Any, key: str | None) -> Any:
    """The tensor whose change the identity describes: the parameter, or its state entry
    ``key`` (the parameter itself before the optimizer creates it)."""
    if key is None:
        return p.detach()
    return optimizer.state.get(p, {}).get(key, p).detach()


def _close(actual: Any, expected: Any, atol: float, relative: float, what: str) -> None:
    import torch

    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double().expand_as(actual)
    tolerance = atol + relative * actual.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"{what}: max error {error:.3g} > {tolerance:.3g}"
