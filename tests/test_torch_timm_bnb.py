"""Lion and the Adam variants of timm, pytorch_optimizer, lion-pytorch and bitsandbytes
against their real steps (SPEC §1, §5, §6).

One table of cases run through ``lrscope.testing.check_identity``, in float64 and float32
(bitsandbytes computes every step in float32: float32 only); then what the identity does
not cover: the large-tensor (compiled) statistics, bitsandbytes' 8-bit states (eta from
the dequantized state, within the quantization error), the reported scalars, and options
lrscope does not model.

(timm is loaded by ``tests._optimizer_identity.timm_optimizer``: see there.)
"""

from __future__ import annotations

import math

import pytest

from tests._optimizer_identity import (FILTERS, assert_unknown_option_reported,
                                       assert_watch_does_not_change_training, package, timm_optimizer)
from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope import registry  # noqa: E402
from lrscope.testing import check_identity  # noqa: E402
from lrscope.torch.reader import TorchReader  # noqa: E402

pytestmark = FILTERS


def timm(module: str, name: str, **options):
    return lambda params: timm_optimizer(module, name)(params, **options)


def po(name: str, **options):
    return lambda params: getattr(package("pytorch_optimizer"), name)(params, **options)


def lion_pytorch(**options):
    return lambda params: package("lion_pytorch").Lion(params, **options)


def bnb(name: str, **options):
    return lambda params: getattr(package("bitsandbytes").optim, name)(params, **options)


SHAPES = dict(shapes=((4, 3), (5,), (), (3, 2, 2)), steps=5)
NO_SCALAR = dict(shapes=((4, 3), (5,), (3, 2, 2)), steps=5)  # pytorch_optimizer's global clip breaks on 0-d
SCHEDULE = dict(scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.7))
FLOAT32_ONLY = "bitsandbytes computes the step in float32"

# (id, factory (params -> optimizer), check_identity options)
CASES = [
    ("timm-lion", lambda: timm("lion", "Lion", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("timm-lion-wd-maximize-corrected", lambda: timm("lion", "Lion", lr=0.01, weight_decay=0.1, maximize=True,
                                                     corrected_weight_decay=True), dict(**SHAPES, **SCHEDULE)),
    ("timm-lion-foreach", lambda: timm("lion", "Lion", lr=0.01, weight_decay=0.1, foreach=True), SHAPES),
    ("timm-adamw-legacy-amsgrad-corrected", lambda: timm("adamw", "AdamWLegacy", lr=0.01, weight_decay=0.1,
                                                         amsgrad=True, corrected_weight_decay=True),
     dict(**SHAPES, **SCHEDULE)),
    ("timm-adamw-legacy-foreach-maximize", lambda: timm("adamw", "AdamWLegacy", lr=0.01, foreach=True, maximize=True),
     SHAPES),
    ("timm-nadamw", lambda: timm("nadamw", "NAdamW", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("timm-nadamw-maximize-corrected-foreach", lambda: timm("nadamw", "NAdamW", lr=0.01, maximize=True, foreach=True,
                                                            corrected_weight_decay=True), SHAPES),
    ("timm-laprop-wd", lambda: timm("laprop", "LaProp", lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("timm-laprop-corrected-foreach", lambda: timm("laprop", "LaProp", lr=0.01, weight_decay=0.1, foreach=True,
                                                   corrected_weight_decay=True), SHAPES),
    ("timm-adopt", lambda: timm("adopt", "Adopt", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("timm-adopt-coupled-wd-maximize", lambda: timm("adopt", "Adopt", lr=0.01, weight_decay=0.1, maximize=True),
     SHAPES),
    ("timm-adopt-decoupled-foreach", lambda: timm("adopt", "Adopt", lr=0.01, weight_decay=0.1, decoupled=True,
                                                  foreach=True, clip_exp=None), SHAPES),
    ("timm-adan-prox", lambda: timm("adan", "Adan", lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("timm-adan-no-prox-foreach", lambda: timm("adan", "Adan", lr=0.01, weight_decay=0.1, no_prox=True,
                                               foreach=True), SHAPES),
    ("timm-lamb", lambda: timm("lamb", "Lamb", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("timm-lamb-large-lr-trust-clip", lambda: timm("lamb", "Lamb", lr=0.5, weight_decay=1.0, trust_clip=True),
     SHAPES),
    ("timm-lamb-decoupled-corrected", lambda: timm("lamb", "Lamb", lr=0.01, weight_decay=0.1, decoupled_decay=True,
                                                   corrected_weight_decay=True, trust_clip=True), SHAPES),
    ("timm-lamb-no-bias-correction-no-averaging", lambda: timm("lamb", "Lamb", lr=0.01, bias_correction=False,
                                                               grad_averaging=False, max_grad_norm=None), SHAPES),
    ("timm-lamb-always-adapt-foreach", lambda: timm("lamb", "Lamb", lr=0.01, weight_decay=0.0, always_adapt=True,
                                                    foreach=True), SHAPES),
    ("timm-lamb-no-adapt", lambda: timm("lamb", "Lamb", lr=0.01, weight_decay=0.0), SHAPES),
    ("timm-mars", lambda: timm("mars", "Mars", lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("timm-mars-lion-1d-factor", lambda: timm("mars", "Mars", lr=0.01, weight_decay=0.1, mars_type="lion",
                                              lr_1d_factor=0.5, betas_1d=(0.8, 0.95)), SHAPES),
    ("timm-mars-optimize-1d", lambda: timm("mars", "Mars", lr=0.01, optimize_1d=True), SHAPES),
    ("po-lion", lambda: po("Lion", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-lion-decoupled-wd-foreach", lambda: po("Lion", lr=0.01, weight_decay=0.1, foreach=True), SHAPES),
    ("po-lion-coupled-wd", lambda: po("Lion", lr=0.01, weight_decay=0.1, weight_decouple=False), SHAPES),
    ("po-lion-fixed-decay-maximize", lambda: po("Lion", lr=0.01, weight_decay=0.01, fixed_decay=True, maximize=True),
     SHAPES),
    ("po-adopt", lambda: po("ADOPT", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-adopt-coupled-wd-maximize", lambda: po("ADOPT", lr=0.01, weight_decay=0.1, maximize=True), SHAPES),
    ("po-adopt-decoupled-fixed-foreach", lambda: po("ADOPT", lr=0.01, weight_decay=0.01, weight_decouple=True,
                                                    fixed_decay=True, foreach=True), SHAPES),
    ("po-adan-prox", lambda: po("Adan", lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("po-adan-decoupled-clip", lambda: po("Adan", lr=0.01, weight_decay=0.1, weight_decouple=True, max_grad_norm=1.0),
     NO_SCALAR),
    ("po-adan-foreach", lambda: po("Adan", lr=0.01, foreach=True), SHAPES),
    ("po-ademamix", lambda: po("AdEMAMix", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-ademamix-warmup-decoupled", lambda: po("AdEMAMix", lr=0.01, t_alpha_beta3=3, weight_decay=0.1,
                                                weight_decouple=True), SHAPES),
    ("po-ademamix-coupled-foreach", lambda: po("AdEMAMix", lr=0.01, weight_decay=0.1, foreach=True), SHAPES),
    ("lion-pytorch", lambda: lion_pytorch(lr=0.01, weight_decay=0.1), dict(**SHAPES, **SCHEDULE)),
    ("lion-pytorch-decoupled-wd", lambda: lion_pytorch(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     dict(**SHAPES, **SCHEDULE)),
    # bitsandbytes: tensors of fewer than min_8bit_size (4096) elements keep float32 state
    ("bnb-adam8bit-small", lambda: bnb("Adam8bit", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("bnb-adamw8bit-small-wd", lambda: bnb("AdamW8bit", lr=0.01, weight_decay=0.1), SHAPES),
    ("bnb-adam32bit-wd", lambda: bnb("Adam32bit", lr=0.01, weight_decay=0.1), SHAPES),
    ("bnb-paged-adamw32bit", lambda: bnb("PagedAdamW32bit", lr=0.01), SHAPES),
    ("bnb-lion8bit-small", lambda: bnb("Lion8bit", lr=0.01, weight_decay=0.1), SHAPES),
    ("bnb-paged-lion32bit", lambda: bnb("PagedLion32bit", lr=0.01), SHAPES),
    ("bnb-ademamix8bit-small-warmup", lambda: bnb("AdEMAMix8bit", lr=0.01, t_alpha=3, weight_decay=0.1), SHAPES),
    ("bnb-ademamix-32-bits", lambda: bnb("AdEMAMix", lr=0.01, optim_bits=32), SHAPES),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id,factory,options", CASES, ids=[c[0] for c in CASES])
def test_identity_against_real_step(case_id, factory, options, dtype):
    if case_id.startswith("bnb") and dtype == "float64":
        pytest.skip(FLOAT32_ONLY)
    reports = check_identity(factory(), dtype=dtype, **options)
    assert [r.t for r in reports] == list(range(1, len(reports) + 1))


EXPECTED_FAMILY = {"timm-lion": "lion", "timm-adamw-legacy-amsgrad-corrected": "adamw", "timm-nadamw":
                   "adamw_nesterov", "timm-laprop-wd": "laprop", "timm-adopt": "adopt", "timm-adan-prox": "adan",
                   "timm-lamb": "lamb", "timm-mars": "mars", "po-lion": "lion", "po-adopt": "adopt",
                   "po-adan-prox": "adan", "po-ademamix": "ademamix", "lion-pytorch": "lion",
                   "bnb-adam8bit-small": "adamw", "bnb-lion8bit-small": "lion",
                   "bnb-ademamix8bit-small-warmup": "ademamix"}


@pytest.mark.parametrize("case_id,family", sorted(EXPECTED_FAMILY.items()))
def test_modelled_not_the_fallback(case_id, family):
    _, factory, _ = next(c for c in CASES if c[0] == case_id)
    optimizer = factory()([torch.nn.Parameter(torch.randn(3))])
    assert lrscope.inspect(optimizer).family == family


@pytest.mark.parametrize("case_id,dtype", [
    ("timm-lion-wd-maximize-corrected", "float32"), ("timm-nadamw", "float32"), ("timm-laprop-wd", "float32"),
    ("timm-adan-prox", "float32"), ("po-ademamix-warmup-decoupled", "float32"), ("timm-mars", "float32"),
    # ADOPT's eta needs v before the step, recovered from v after it: in float32 the
    # compiled loop's rounding of that cancellation differs from the eager one's by a few
    # units of v (the identity holds either way: eta * d = lr * m)
    ("timm-adopt", "float64"), ("po-adopt-coupled-wd-maximize", "float64")])
def test_large_tensor_statistics(case_id, dtype):
    """A tensor large enough for the compiled statistics (``lrscope.torch.fused``): the
    formula is traced and compiled, and the report still describes eta."""
    _, factory, options = next(c for c in CASES if c[0] == case_id)
    check_identity(factory(), dtype=dtype, **{**options, "steps": 3, "shapes": ((300, 300), (7,))})


@pytest.mark.parametrize("name,options", [
    ("Adam8bit", dict(lr=0.01)), ("AdamW8bit", dict(lr=0.01, weight_decay=0.1)),
    ("PagedAdamW8bit", dict(lr=0.01)), ("Lion8bit", dict(lr=0.01)), ("AdEMAMix8bit", dict(lr=0.01, t_alpha=4)),
])
def test_bnb_8bit_state_is_dequantized(name, options):
    """Tensors of at least 4096 elements keep 8-bit states; the step used the float32
    moments before they were quantized again, so the model from the dequantized state
    describes the step within the quantization error: the reconstructed update is within
    10 % of the realized one in norm, and almost every element within 10 %."""
    functional = package("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 80, generator=g))
    bias = torch.nn.Parameter(torch.randn(80, generator=g))
    optimizer = bnb(name, **options)([weight, bias])
    reader = TorchReader(optimizer)
    assert reader.family is not None
    with lrscope.watch(optimizer, findings=False) as monitor:
        for step in range(1, 7):
            weight.grad = torch.randn(weight.shape, generator=g) * (1 + step % 3)
            bias.grad = torch.randn(bias.shape, generator=g)
            before = {"param0": weight.detach().clone(), "param1": bias.detach().clone()}
            pending = reader.begin(step, True)
            optimizer.step()
            params = {"param0": weight, "param1": bias}
            for tensor_name, el in reader.elementwise(pending):
                realized = params[tensor_name].detach() - before[tensor_name]
                predicted = -el.eta * el.direction - el.decay_rate * before[tensor_name]
                error = (realized - predicted).abs()
                if tensor_name == "param1":  # 80 elements: the float32 path, exact up to rounding
                    rounding = 4 * torch.finfo(torch.float32).eps * before[tensor_name].abs().max()
                    assert error.max() <= 1e-5 * realized.abs().max() + rounding
                    continue
                assert error.norm() <= 0.1 * realized.norm(), f"step {step}"
                assert (error > 0.1 * realized.abs()).float().mean() < 0.03, f"step {step}"
            report = monitor.last
            assert not [n for n in report.notes if "not modelled" in n or "unknown" in n]
            assert report.groups[0].params["param0"].effective_lr.count == weight.numel()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8
    stored = state["state1"][0] if state["state1"].dim() == 3 else state["state1"]
    absmax = state["absmax1"][0] if state["absmax1"].dim() == 2 else state["absmax1"]
    m = functional.dequantize_blockwise(stored, absmax=absmax, code=state["qmap1"], blocksize=256)
    assert m.shape == weight.shape and torch.isfinite(m).all()


def test_reported_scalars():
    """What the identity cannot see: ADOPT's first step (only v is initialised) has step
    size 0; Adan's two step sizes; AdEMAMix's alpha warmup; timm's corrected decay."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    adopt = po("ADOPT", lr=0.01)([w])
    adan = timm("adan", "Adan", lr=0.01)([w])
    ademamix = po("AdEMAMix", lr=0.01, t_alpha_beta3=4)([w])
    lion = timm("lion", "Lion", lr=0.01, weight_decay=0.1, corrected_weight_decay=True)([w])
    seen = {}
    for key, optimizer in (("adopt", adopt), ("adan", adan), ("ademamix", ademamix), ("lion", lion)):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
        with lrscope.watch(optimizer, findings=False) as monitor:
            for _ in range(3):
                w.grad = torch.randn(4, 3, dtype=torch.float64)
                optimizer.step()
                scheduler.step()
                seen.setdefault(key, []).append(monitor.last.groups[0])
    assert [g.step_size for g in seen["adopt"]] == pytest.approx([0.0, 0.01 / 2, 0.01 / 3], rel=1e-15)
    first = seen["adan"][0]
    assert first.step_size == pytest.approx(0.01 * math.sqrt(1 - 0.99) / (1 - 0.98))
    assert first.extra["step_size_diff"] == pytest.approx(0.01 * 0.92 * math.sqrt(1 - 0.99) / (1 - 0.92))
    assert [g.extra["alpha_t"] for g in seen["ademamix"]] == pytest.approx([5.0 / 4, 2 * 5.0 / 4, 3 * 5.0 / 4])
    # corrected decay: lr**2 / max_lr * wd, max_lr the constructor's lr
    assert [g.weight_decay_rate for g in seen["lion"]] == pytest.approx(
        [(0.01 / k) ** 2 / 0.01 * 0.1 for k in (1, 2, 3)], rel=1e-12)


@pytest.mark.parametrize("factory,key,value", [
    (lambda: timm("lion", "Lion", lr=0.01), "caution", True),
    (lambda: timm("adopt", "Adopt"), "caution", True),
    (lambda: timm("nadamw", "NAdamW"), "clipping_threshold", 1.0),
    (lambda: timm("lamb", "Lamb"), "a_new_option", 1.0),
    (lambda: po("Lion"), "cautious", True),
    (lambda: po("ADOPT"), "stable_adamw", True),
    (lambda: po("AdEMAMix"), "a_new_option", 1),
    (lambda: lion_pytorch(), "a_new_option", 0.5),
    (lambda: bnb("AdamW8bit"), "a_new_option", True),
    (lambda: bnb("Lion8bit"), "a_new_option", True),
], ids=["timm-lion-caution", "timm-adopt-caution", "timm-nadamw-clipping", "timm-lamb", "po-lion-cautious",
        "po-adopt-stable-adamw", "po-ademamix", "lion-pytorch", "bnb-adamw8bit", "bnb-lion8bit"])
def test_unknown_options_are_reported_not_modelled(factory, key, value):
    assert_unknown_option_reported(factory(), key, value)


@pytest.mark.parametrize("setup", ["max_unorm", "override"])
def test_bnb_options_outside_the_group_are_unknown(setup):
    """bitsandbytes keeps some options outside the param groups: update-norm clipping
    (``args.max_unorm``) and per-parameter overrides; lrscope reports such a group as
    unknown (NaN), never as modelled."""
    bitsandbytes = package("bitsandbytes")
    w = torch.nn.Parameter(torch.randn(4, 3))
    if setup == "max_unorm":
        optimizer = bitsandbytes.optim.Adam32bit([w], lr=0.01)
        optimizer.args.max_unorm = 1.0  # (the Adam classes take it only through args=)
    else:
        optimizer = bitsandbytes.optim.Adam8bit([w], lr=0.01)
        bitsandbytes.optim.GlobalOptimManager.get_instance().override_config(w, "betas", (0.5, 0.9))
    try:
        with lrscope.watch(optimizer, findings=False) as monitor:
            w.grad = torch.randn(4, 3)
            optimizer.step()
    finally:
        bitsandbytes.optim.GlobalOptimManager.get_instance().pid2config.pop(id(w), None)
    group = monitor.last.groups[0]
    assert math.isnan(group.step_size) and group.effective_lr is None
    assert any("not modelled" in note for note in monitor.last.notes)


@pytest.mark.parametrize("case_id", ["timm-lion", "timm-adopt", "timm-lamb", "po-adan-prox", "lion-pytorch",
                                     "bnb-adam8bit-small"])
def test_watch_does_not_change_training(case_id):
    _, factory, _ = next(c for c in CASES if c[0] == case_id)
    assert_watch_does_not_change_training(factory(), ((4, 3), (5,)), steps=6, every=2)


def test_bnb_ademamix_32bit_classes_are_not_modelled():
    """bitsandbytes 0.50.2's AdEMAMix32bit keeps one state buffer where its step reads
    two (m1 and m2): not registered, so never modelled by mistake."""
    bitsandbytes = package("bitsandbytes")
    assert registry.model_for(bitsandbytes.optim.AdEMAMix32bit) is None
    assert registry.model_for(bitsandbytes.optim.AdEMAMix).family == "ademamix"
