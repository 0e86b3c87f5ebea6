"""GPU paths: no device-to-host synchronisation on steps that compute no distribution,
one transfer on steps that do.

Skipped without CUDA; run on a GPU machine with `pytest tests/test_torch_gpu.py`.
(``tests/test_torch_watch.py::test_device_path_run_on_the_cpu`` runs the same code path
on the CPU.)
"""

from __future__ import annotations

import warnings

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPTIONS = [{"fused": True}, {"capturable": True}, {"foreach": True}]


def _model_and_optimizer(options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()},
                                   {"params": model[2].parameters(), "weight_decay": 0.0}],
                                  lr=1e-3, **options)
    return model, optimizer


@pytest.mark.parametrize("options", OPTIONS)
def test_synchronisations_per_step(options):
    """No synchronising call on steps without distributions (the report read included: it
    is built on access and reads nothing on the device): there the sync debug mode is
    "error", so any synchronisation raises.  Exactly one on measured steps, counted in
    "warn" mode: both groups' statistics and, where they live on the GPU (fused,
    capturable), their step counters reach the host in one copy."""
    model, optimizer = _model_and_optimizer(options)
    x = torch.randn(32, 64, device="cuda")
    with lrscope.watch(optimizer, model=model, every=3) as monitor:
        for step in range(1, 8):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            torch.cuda.synchronize()
            measured = (step - 1) % 3 == 0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if measured else "error")
                try:
                    optimizer.step()
                    report = monitor.last
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) == (1 if measured else 0), syncs
            assert report.t == step
            assert (report.groups[1].effective_lr is not None) == measured
    assert report.groups[0].step_size == pytest.approx(lrscope.step_size("adamw", 7, lr=1e-3))
