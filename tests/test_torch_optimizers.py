"""The SPEC §5 identity against every torch.optim optimizer lrscope models.

One table of cases (optimizer x options x dtype) and generic tests: real steps with a
scheduler, theta snapshot before each step, and
``theta_after - theta_before == -eta * d - decay_rate * theta_before`` elementwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
from lrscope.torch import optimizers  # noqa: E402
from lrscope.torch import reader as backend  # noqa: E402
from lrscope.torch.state import elementwise_of  # noqa: E402

O = torch.optim
STEPS = 8  # RAdam switches to the rectified regime at t = 6

# (id, optimizer class, options, supports complex parameters)
CASES = [
    ("sgd", O.SGD, dict(lr=0.1), True),
    ("sgd-momentum-dampening-wd", O.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), True),
    ("sgd-nesterov-wd", O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), True),
    ("sgd-maximize", O.SGD, dict(lr=0.1, maximize=True, weight_decay=0.01), True),
    ("sgd-fused", O.SGD, dict(lr=0.1, momentum=0.5, fused=True), False),
    ("adam", O.Adam, dict(lr=0.01), True),
    ("adam-amsgrad", O.Adam, dict(lr=0.01, amsgrad=True), True),
    ("adam-maximize", O.Adam, dict(lr=0.01, maximize=True), True),
    ("adam-coupled-wd", O.Adam, dict(lr=0.01, weight_decay=0.1), True),
    ("adam-decoupled-wd", O.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), True),
    ("adam-foreach", O.Adam, dict(lr=0.01, foreach=True), True),
    ("adam-fused", O.Adam, dict(lr=0.01, fused=True, amsgrad=True), False),
    ("adam-tensor-lr", O.Adam, dict(lr=torch.tensor(0.01)), True),
    ("adam-capturable", O.Adam, dict(lr=0.01, capturable=True), True),
    ("adamw", O.AdamW, dict(lr=0.01), True),
    ("adamw-amsgrad-wd", O.AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True), True),
    ("adamax", O.Adamax, dict(lr=0.01), True),
    ("adamax-wd", O.Adamax, dict(lr=0.01, weight_decay=0.1), True),
    ("nadam", O.NAdam, dict(lr=0.01), True),
    ("nadam-coupled-wd", O.NAdam, dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01), True),
    ("nadam-decoupled-wd", O.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), True),
    ("radam", O.RAdam, dict(lr=0.01), True),
    ("radam-coupled-wd", O.RAdam, dict(lr=0.01, weight_decay=0.1), True),
    ("radam-decoupled-wd", O.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), True),
    ("adagrad", O.Adagrad, dict(lr=0.1), True),
    ("adagrad-decay-init-wd", O.Adagrad, dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5,
                                              weight_decay=0.1), True),
    ("rmsprop", O.RMSprop, dict(lr=0.01), True),
    ("rmsprop-centered-wd", O.RMSprop, dict(lr=0.01, centered=True, weight_decay=0.1), True),
    ("rmsprop-momentum", O.RMSprop, dict(lr=0.01, momentum=0.9), True),
    ("rmsprop-centered-momentum", O.RMSprop, dict(lr=0.01, centered=True, momentum=0.9), True),
    ("adadelta", O.Adadelta, dict(), True),
    ("adadelta-wd-maximize", O.Adadelta, dict(lr=0.5, weight_decay=0.1, maximize=True), True),
    ("rprop", O.Rprop, dict(lr=0.01), True),
    ("asgd", O.ASGD, dict(lr=0.05, lambd=0.01), True),
    ("asgd-wd", O.ASGD, dict(lr=0.05, lambd=0.01, weight_decay=0.1), True),
    ("adafactor", O.Adafactor, dict(lr=0.01), False),
    ("adafactor-wd-maximize-clip", O.Adafactor, dict(lr=0.5, weight_decay=0.1, maximize=True, d=2.0), False),
]
DTYPES = [torch.float64, torch.float32]


def device_for(options: dict) -> str:
    """Capturable optimizers step on a GPU (skipped without one); the others on the CPU."""
    if not options.get("capturable"):
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("capturable optimizers need a GPU")
    return "cuda"


def make_params(dtype: torch.dtype, with_complex: bool, device: str = "cpu") -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = {"scalar": (), "vector": (5,), "matrix": (4, 3)}
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
              for name, shape in shapes.items()}
    params["frozen"] = torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype), requires_grad=False)
    if with_complex:
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        params["complex"] = torch.nn.Parameter(torch.randn(3, generator=g, dtype=cdtype))
    return {name: torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            for name, p in params.items()}


def make_optimizer(cls, options, params):
    options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    named = [p for n, p in params.items()]
    try:
        return cls(named, **options)
    except (RuntimeError, ValueError) as error:  # e.g. capturable or fused unsupported here
        pytest.skip(f"{cls.__name__}({options}) not available on this build: {error}")


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for name, p in params.items():
        if not p.requires_grad or (name == "vector" and step == 4):
            p.grad = None  # frozen, and a parameter without gradient on one step
            continue
        real = torch.randn(p.shape, generator=g, dtype=torch.float64) * (1 + step % 3)
        if p.is_complex():
            real = torch.complex(real, torch.randn(p.shape, generator=g, dtype=torch.float64))
        p.grad = real.to(p.device, p.dtype)


def recorded_before(optimizer):
    """What the monitor's pre-hook records (Adadelta's acc_delta, ASGD's eta), by param id."""
    return backend.TorchReader(optimizer).begin(0, distributions=True).recorded


def real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case_id,cls,options,with_complex", CASES, ids=[c[0] for c in CASES])
def test_identity_against_real_step(case_id, cls, options, with_complex, dtype):
    params = make_params(dtype, with_complex, device_for(options))
    optimizer = make_optimizer(cls, options, params)
    scheduler = O.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    monitor = lrscope.watch(optimizer, model=None)
    family = optimizers.family_of(optimizer)
    names = {id(p): n for n, p in params.items()}
    # Rounding of theta_after - theta_before (a few ulps of theta) plus a relative error
    # of the step itself (torch computes it in the parameter's dtype).
    ulp, relative = torch.finfo(dtype).eps, (1e-12 if dtype == torch.float64 else 1e-5)
    if isinstance(options.get("lr"), torch.Tensor) or options.get("capturable"):
        # A float32 Tensor lr, or a capturable step's float32 step counter on the device,
        # makes torch compute the scalar factors (bias corrections, step size) in float32.
        relative = 1e-6
    for step in range(1, STEPS + 1):
        set_grads(params, step)
        before = {n: p.detach().clone() for n, p in params.items()}
        recorded = recorded_before(optimizer)
        lr_used = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        report = monitor.last
        group = optimizer.param_groups[0]
        h, unsupported = optimizers.hyperparameters(family, group, group["lr"])
        assert not unsupported
        moved = 0
        for p in group["params"]:
            name = names[id(p)]
            if p.grad is None:
                assert torch.equal(p.detach(), before[name]), f"{name} moved without a gradient"
                continue
            el = elementwise_of(family, optimizer.state[p], p, h, recorded.get(id(p)))
            delta = real(p.detach() - before[name]).double()
            predicted = (-el.eta * el.direction - el.decay_rate * real(before[name])).double()
            atol = 4 * ulp * real(before[name]).abs().max().item() + relative * delta.abs().max().item()
            assert torch.allclose(delta, predicted, rtol=0, atol=atol), (
                f"{case_id} step {step} {name}: max error {(delta - predicted).abs().max().item():.3g}"
            )
            moved += 1
            # The monitor's distribution describes the same eta (quantiles within 1 %).
            eta = np.broadcast_to(torch.as_tensor(el.eta).double().cpu().numpy(), delta.shape).ravel()
            dist = report.groups[0].params[f"param{list(params).index(name)}"].effective_lr
            assert dist.count == eta.size
            assert dist.min == pytest.approx(eta.min(), rel=1e-6)
            assert dist.max == pytest.approx(eta.max(), rel=1e-6)
            for q in (0.05, 0.5, 0.95):
                exact = np.quantile(eta, q)
                assert abs(dist.quantile(q) - exact) <= 0.01 * abs(exact) + 1e-300
        assert moved >= 2
        assert report.t == step
        assert report.groups[0].lr == pytest.approx(lr_used), "the report must show the lr the step used"
        assert not report.notes
        scheduler.step()
    monitor.close()


@pytest.mark.parametrize("case_id,cls,options,with_complex", CASES, ids=[c[0] for c in CASES])
def test_watch_does_not_change_training(case_id, cls, options, with_complex):
    results = []
    device = device_for(options)
    for watched in (False, True):
        params = make_params(torch.float32, with_complex, device)
        optimizer = make_optimizer(cls, options, params)
        monitor = lrscope.watch(optimizer, every=3) if watched else None
        for step in range(1, 51):
            set_grads(params, step)
            optimizer.step()
        if monitor:
            monitor.close()
        results.append({n: p.detach().clone() for n, p in params.items()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), f"{case_id}: {name} differs"


def test_step_size_matches_closed_form_and_scheduler_does_not_leak():
    w = torch.nn.Parameter(torch.ones(4))
    optimizer = O.Adam([w], lr=1e-3, betas=(0.8, 0.99))
    scheduler = O.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
    with lrscope.watch(optimizer) as monitor:
        for t in range(1, 6):
            w.grad = torch.full((4,), float(t))
            optimizer.step()
            scheduler.step()  # already sets the *next* step's lr
            lr = 1e-3 / t
            expected = lr * math.sqrt(1 - 0.99**t) / (1 - 0.8**t)
            assert monitor.last.t == t
            assert monitor.last.groups[0].lr == pytest.approx(lr)
            assert monitor.last.groups[0].step_size == pytest.approx(expected, rel=1e-12)
    # inspect() has no hook: it reads the lr now in the group and says so.
    report = lrscope.inspect(optimizer)
    assert report.groups[0].lr == pytest.approx(1e-3 / 6)
    assert any("scheduler" in note for note in report.notes)


@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9, weight_decay=0.01)], ids=["plain", "momentum-wd"])
def test_inspect_sgd_without_step_counter(options):
    """torch's SGD keeps no step counter: inspect() still reports eta = lr and the real
    update, and says that t is unknown."""
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(64, 32, generator=g, dtype=torch.float64))
    optimizer = O.SGD([w], lr=0.05, **options)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
        optimizer.step()
    report = lrscope.inspect(optimizer)
    group = report.groups[0]
    assert report.t == 0 and any("no step counter" in note for note in report.notes)
    assert group.step_size == 0.05
    dist = group.params["param0"].effective_lr
    assert dist.count == w.numel() and dist.min == dist.max == 0.05
    assert group.params["param0"].update_norm == pytest.approx((w.detach() - before).norm().item(), rel=1e-12)


@pytest.mark.parametrize("case_id", ["adam", "sgd", "rmsprop-centered-momentum", "nadam-decoupled-wd"])
def test_small_tensors_measured_together_as_alone(case_id, monkeypatch):
    """Small tensors sharing a formula go through one formula call (torch_small): each
    tensor's statistics match numpy on its exact eta and the tensor-by-tensor path, and a
    tensor holding NaN is redone alone without touching the others."""
    from lrscope.torch import small as torch_small

    _, cls, options, _ = next(c for c in CASES if c[0] == case_id)
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7,), (30, 20), (5, 1), (300,), (2, 3, 4)]]
    optimizer = make_optimizer(cls, options, {str(i): p for i, p in enumerate(params)})
    for step in range(1, 4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (torch.rand(p.shape, generator=g) * 6 - 4)
        optimizer.step()
    if "exp_avg_sq" in optimizer.state[params[1]]:
        optimizer.state[params[1]]["exp_avg_sq"][0, 0] = float("nan")
    batches = []
    compute = torch_small._Batch._compute
    monkeypatch.setattr(torch_small._Batch, "_compute", lambda self: batches.append(len(self.items)) or compute(self))
    together = lrscope.inspect(optimizer).groups[0]
    assert batches == [len(params)]
    monkeypatch.setattr(torch_small, "SMALL_ELEMENTS", 0)
    alone = lrscope.inspect(optimizer).groups[0]
    assert batches == [len(params)]
    family = optimizers.family_of(optimizer)
    h, _ = optimizers.hyperparameters(family, optimizer.param_groups[0], optimizer.param_groups[0]["lr"])
    for i, p in enumerate(params):
        got, reference = together.params[f"param{i}"], alone.params[f"param{i}"]
        el = elementwise_of(family, optimizer.state[p], p, h)
        eta = np.broadcast_to(torch.as_tensor(el.eta).double().numpy(), p.shape).ravel()
        finite = eta[np.isfinite(eta)]
        dist = got.effective_lr
        assert dist.count == eta.size and dist.nonfinite == eta.size - finite.size
        assert dist.min == pytest.approx(finite.min(), rel=1e-6) and dist.max == pytest.approx(finite.max(), rel=1e-6)
        assert dist.mean == pytest.approx(finite.mean(), rel=1e-6)
        for q in (0.05, 0.5, 0.95):
            assert abs(dist.quantile(q) - np.quantile(finite, q)) <= 0.01 * np.quantile(finite, q)
        for mine, theirs in zip(dist.sketch.positive, reference.effective_lr.sketch.positive):
            np.testing.assert_array_equal(mine, theirs)  # the same bucket counts
        assert dist.summary() == pytest.approx(reference.effective_lr.summary(), rel=1e-12, nan_ok=True)
        # (tensor by tensor, a scalar eta's norms are summed in float32, here in float64)
        assert (got.update_norm, got.param_norm) == pytest.approx((reference.update_norm, reference.param_norm),
                                                                  rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("spread", [50, 1 << 15], ids=["narrow-bincount", "wide-sort"])
def test_segment_counts_match_unique_per_segment(spread):
    from lrscope.torch.small import segment_counts

    rng = np.random.default_rng(spread)
    sizes = rng.integers(1, 40, size=30)
    keys = rng.integers(0, spread, size=sizes.sum()) + 9000 * (spread < 100)
    start = 0
    for size, (indices, counts) in zip(sizes, segment_counts(keys, sizes)):
        expected = np.unique(keys[start:start + size], return_counts=True)
        np.testing.assert_array_equal(indices, expected[0])
        np.testing.assert_array_equal(counts, expected[1])
        start += size
