"""GPU paths: no device-to-host synchronisation on steps that compute no distribution,
one transfer on steps that do.

Skipped without CUDA; run on a GPU machine with `pytest tests/test_torch_gpu.py`.
(``tests/test_torch_watch.py::test_device_path_run_on_the_cpu`` runs the same code path
on the CPU.)
"""

from __future__ import annotations

import json
import warnings

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
from lrscope.sinks import JsonlSink  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPTIONS = [{"fused": True}, {"capturable": True}, {"foreach": True}]
# What "warn" mode says per synchronising call (its first use also warns that the mode is
# a prototype, which is not a synchronisation).
SYNC_WARNING = "called a synchronizing CUDA operation"


def _model_and_optimizer(options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()},
                                   {"params": model[2].parameters(), "weight_decay": 0.0}],
                                  lr=1e-3, **options)
    return model, optimizer


def _step_counting_syncs(optimizer, debug_mode: str, monitor) -> tuple[int, object]:
    """``optimizer.step()`` and a read of ``monitor.last`` under ``debug_mode``; the number
    of synchronising calls they made, and the report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(debug_mode)
        try:
            optimizer.step()
            report = monitor.last
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(SYNC_WARNING in str(w.message) for w in caught), report


@pytest.mark.parametrize("sinks", [False, True], ids=["no sinks", "jsonl sink"])
@pytest.mark.parametrize("options", OPTIONS, ids=["fused", "capturable", "foreach"])
def test_synchronisations_per_step(options, sinks, tmp_path):
    """No synchronising call on steps without distributions (the report read included: it
    is built on access and reads nothing on the device; with a sink it is built and
    written every step from what the host knows): there the sync debug mode is "error",
    so any synchronisation raises.  Exactly one on measured steps, counted in "warn" mode:
    both groups' statistics and, where they live on the GPU (fused, capturable), their
    step counters reach the host in one copy.  The statistics are those of eta computed
    here from the optimizer's state."""
    model, optimizer = _model_and_optimizer(options)
    x = torch.randn(32, 64, device="cuda")
    log = [JsonlSink(tmp_path / "lrscope.jsonl")] if sinks else None
    with lrscope.watch(optimizer, model=model, every=3, sinks=log) as monitor:
        for step in range(1, 8):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            torch.cuda.synchronize()
            measured = (step - 1) % 3 == 0
            syncs, report = _step_counting_syncs(optimizer, "warn" if measured else "error", monitor)
            assert syncs == (1 if measured else 0)
            assert report.t == step
            assert (report.groups[1].effective_lr is not None) == measured
    assert report.groups[0].step_size == pytest.approx(lrscope.step_size("adamw", 7, lr=1e-3))
    eta = torch.cat([(1e-3 / ((optimizer.state[p]["exp_avg_sq"] / (1 - 0.999**7)).sqrt() + 1e-8)).reshape(-1)
                     for p in model[2].parameters()])
    # (fused and capturable steps, and lrscope with them, take 1 - beta2**t in float32 on the
    # device: about 1e-5 from this float64 value at t = 7)
    rel = 1e-6 if "foreach" in options else 5e-5
    dist = report.groups[1].effective_lr
    assert (dist.min, dist.max) == pytest.approx((eta.min().item(), eta.max().item()), rel=rel)
    assert dist.mean == pytest.approx(eta.double().mean().item(), rel=rel)
    assert dist.count == eta.numel()
    if sinks:
        assert [json.loads(line)["t"] for line in (tmp_path / "lrscope.jsonl").read_text().splitlines()] \
            == list(range(1, 8))


def test_step_captured_in_a_cuda_graph():
    """A capturable step captured into a CUDA graph: lrscope stays out of the capture (a
    measurement would read the device on the host, which capture forbids), says that the
    replays are invisible to hooks, and ``inspect`` after replays reads the state they left."""
    model = torch.nn.Linear(64, 64).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    x = torch.randn(32, 64, device="cuda")
    with lrscope.watch(optimizer, model=model) as monitor:
        side = torch.cuda.Stream()  # warm-up steps on a side stream, as torch's docs do
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with pytest.warns(RuntimeWarning, match="captured into a CUDA graph"), torch.cuda.graph(graph):
            model(x).square().mean().backward()
            optimizer.step()
        for _ in range(4):
            graph.replay()
        assert monitor.last.t == 3
    report = lrscope.inspect(optimizer, model=model)
    assert report.t == 7 == optimizer.state[model.weight]["step"].item()
    assert report.groups[0].step_size == pytest.approx(lrscope.step_size("adam", 7, lr=1e-3))
    assert report.groups[0].effective_lr.count == 64 * 64 + 64


def test_fused_step_skipped_on_the_device_by_grad_scaler():
    """GradScaler hands a fused step its inf flag on the GPU (for other steps it reads the
    flag itself and does not call ``step()``), and the step skips itself there: the flag
    reaches the host in the measured step's one transfer, so that step is reported as
    skipped with t unchanged; steps without distributions read nothing (the monitor counts
    a skipped step there until the next measured one)."""
    model, optimizer = _model_and_optimizer({"fused": True})
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(32, 64, device="cuda")
    seen = []
    with lrscope.watch(optimizer, model=model, every=2) as monitor:
        for step in range(1, 6):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss * (float("inf") if step == 3 else 1.0)).backward()
            scaler.step(optimizer)
            scaler.update()
            seen.append((monitor.last.t, monitor.last.skipped))
    # Step 3 is measured (every=2) and skipped itself: the transfer sets the monitor's
    # count back to 2, so the next steps are t=3 (measured) and t=4.
    assert seen == [(1, False), (2, False), (2, True), (3, False), (4, False)]
