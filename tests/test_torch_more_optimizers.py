"""timm's and pytorch_optimizer's Muon, pytorch_optimizer's LaProp and Lamb, D-Adaptation's
Lion and Adan, and the schedule-free classes besides the three main ones, against their real
steps (SPEC §5, §6).

One table of cases run through ``lrscope.testing.check_identity``, in float64 and float32;
then what the identity cannot see (Muon's eta per matrix, the d a step applied) and the
options lrscope does not model.
"""

from __future__ import annotations

import math

import pytest

from tests._optimizer_identity import (FILTERS, assert_unknown_option_reported,
                                       assert_watch_does_not_change_training, descend, package, timm_optimizer)
from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402,F401
from lrscope.testing import check_identity  # noqa: E402

pytestmark = FILTERS


def timm(module: str, name: str, **options):
    return lambda params: timm_optimizer(module, name)(params, **options)


def po(name: str, **options):
    return lambda params: getattr(package("pytorch_optimizer"), name)(params, **options)


def po_muon(**options):
    """pytorch_optimizer's Muon needs its groups: the matrices (``use_muon``) and the others."""
    def build(params):
        matrices = [p for p in params if p.dim() >= 2]
        others = [p for p in params if p.dim() < 2]
        groups = [{"params": matrices, "use_muon": True}] + ([{"params": others, "use_muon": False}]
                                                             if others else [])
        return package("pytorch_optimizer").Muon(groups, **options)
    return build


def third(package_name: str, cls: str, **options):
    return lambda params: getattr(package(package_name), cls)(params, **options)


# Matrices of several shapes (two of the same: pytorch_optimizer batches them), a 3-D tensor
# (flattened to (out, in * k)), a vector and a scalar (the AdamW fallback).
MUON_SHAPES = dict(shapes=((8, 4), (8, 4), (4, 6), (5, 2, 3), (5,), ()), steps=4)
SHAPES = dict(shapes=((4, 3), (5,), (), (3, 2, 2)), steps=5)
NO_SCALAR = dict(shapes=((4, 3), (5,), (3, 2, 2)), steps=5)  # pytorch_optimizer's global norm breaks on 0-d
TRAIN = dict(before_step=lambda optimizer, step: optimizer.train())
SCHEDULE = dict(scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.7))

# (id, factory (params -> optimizer), check_identity options)
CASES = [
    ("timm-muon", lambda: timm("muon", "Muon", lr=0.02), dict(**MUON_SHAPES, **SCHEDULE)),
    ("timm-muon-original-nesterov-wd", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn="original", nesterov=True,
                                                    weight_decay=0.1), MUON_SHAPES),
    ("timm-muon-rms-to-rms-fallback-scale", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn="rms_to_rms",
                                                         fallback_lr_scale=0.5, weight_decay=0.1), MUON_SHAPES),
    ("timm-muon-batched-no-adjust", lambda: timm("muon", "Muon", lr=0.02, adjust_lr_fn=None, conv_mode="batched",
                                                 ns_coefficients="original"), MUON_SHAPES),
    ("po-muon", lambda: po_muon(lr=0.02), dict(**MUON_SHAPES, **SCHEDULE)),
    ("po-muon-adjusted-wd-loop", lambda: po_muon(lr=0.02, use_adjusted_lr=True, weight_decay=0.1, adamw_wd=0.1,
                                                 foreach=False), MUON_SHAPES),
    ("po-muon-no-nesterov-coupled-maximize", lambda: po_muon(lr=0.02, nesterov=False, weight_decay=0.1,
                                                             weight_decouple=False, maximize=True), MUON_SHAPES),
    ("dadapt-lion", lambda: third("dadaptation", "DAdaptLion", lr=1.0), dict(gradient=descend, steps=8)),
    ("dadapt-lion-wd-group-lr-0", lambda: lambda params: package("dadaptation").DAdaptLion(
        [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}], lr=1.0, weight_decay=0.1),
     dict(gradient=descend, steps=6)),
    ("dadapt-adan", lambda: third("dadaptation", "DAdaptAdan"), dict(gradient=descend, steps=8)),
    ("dadapt-adan-no-prox", lambda: third("dadaptation", "DAdaptAdan", no_prox=True, weight_decay=0.1),
     dict(gradient=descend, steps=8)),
    ("po-lamb", lambda: po("Lamb", lr=0.01), dict(**SHAPES, **SCHEDULE)),
    ("po-lamb-coupled-wd-loop", lambda: po("Lamb", lr=0.01, weight_decay=0.1, weight_decouple=False, foreach=False),
     SHAPES),
    ("po-lamb-decoupled-fixed-pre-norm", lambda: po("Lamb", lr=0.01, weight_decay=0.01, fixed_decay=True,
                                                    pre_norm=True, grad_averaging=False), NO_SCALAR),
    ("po-lamb-large-norm-maximize", lambda: po("Lamb", lr=0.01, weight_decay=0.1, maximize=True),
     dict(shapes=((40, 30), (7,)), steps=4)),  # ||theta|| > 10: capped in the stored ratio
    ("schedulefree-paper-warmup", lambda: third("schedulefree", "AdamWScheduleFreePaper", lr=0.01, warmup_steps=3),
     dict(direction_is_gradient=True, steps=6, **TRAIN)),
    ("schedulefree-paper-wd-r-loop", lambda: third("schedulefree", "AdamWScheduleFreePaper", lr=0.01, weight_decay=0.1,
                                                   r=0.5, foreach=False), dict(steps=6, **TRAIN)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id,factory,options", CASES, ids=[c[0] for c in CASES])
def test_identity_against_real_step(case_id, factory, options, dtype):
    reports = check_identity(factory(), dtype=dtype, **options)
    assert [r.t for r in reports] == list(range(1, len(reports) + 1))
