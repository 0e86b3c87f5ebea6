"""GPU paths: no device-to-host synchronisation on steps that compute no distribution.

Skipped without CUDA; run on a GPU machine with `pytest tests/test_torch_gpu.py`.
"""

from __future__ import annotations

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("options", [{"fused": True}, {"capturable": True}, {"foreach": True}])
def test_no_sync_on_scalar_steps(options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **options)
    x = torch.randn(32, 64, device="cuda")
    with lrscope.watch(optimizer, model=model, every=5) as monitor:
        for step in range(1, 11):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            measured = (step - 1) % 5 == 0
            torch.cuda.set_sync_debug_mode(0 if measured else "error")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert monitor.last.t == step
            assert (monitor.last.groups[0].effective_lr is not None) == measured
    report = monitor.last
    assert report.groups[0].step_size == pytest.approx(lrscope.step_size("adamw", 10, lr=1e-3))
