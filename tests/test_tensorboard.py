"""TensorBoard sink: event files read back by TensorBoard itself, and a real server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lrscope.sinks.tensorboard import TensorBoardSink
from tests._sink_reports import (
    SIZES, WEIGHT_DECAY, lr_at, make_report, step_size_at, write_reports,
)

pytest.importorskip("tensorboardX", reason="pip install 'lrscope[tensorboard]'")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS = 7


def _write(log_dir: Path, **options) -> dict:
    """Reports 1..STEPS (distributions on odd steps) to a TensorBoardSink; returns the raw data."""
    return write_reports([TensorBoardSink(log_dir, **options)], STEPS, every=2)


def _load(log_dir: Path):
    return event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()


def test_event_files_hold_the_scalars(tmp_path):
    raws = _write(tmp_path)
    events = _load(tmp_path)
    for index, group in enumerate(("pg0", "pg1")):
        base = f"lr-Adam/{group}"
        for metric, expected in (("lr", lr_at), ("step_size", step_size_at),
                                 ("weight_decay_rate", lambda t, i: lr_at(t, i) * WEIGHT_DECAY)):
            series = events.Scalars(f"{base}/{metric}")
            assert [e.step for e in series] == list(range(1, STEPS + 1))
            assert np.allclose([e.value for e in series],
                               [expected(t, index) for t in range(1, STEPS + 1)], rtol=1e-6)
        odd = [1, 3, 5, 7]
        for name, q in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            series = events.Scalars(f"{base}/effective_lr/{name}")
            assert [e.step for e in series] == odd
            exact = [np.quantile(raws[t][group].all_eta, q) for t in odd]
            assert np.allclose([e.value for e in series], exact, rtol=0.01)
        eps = events.Scalars(f"{base}/eps_dominated")
        assert np.allclose([e.value for e in eps], [
            sum(raws[t][group].eps_counts.values()) / raws[t][group].all_eta.size for t in odd],
            rtol=1e-6)
        ratio = events.Scalars(f"{base}/update_to_param")
        assert np.allclose([e.value for e in ratio], [raws[t][group].update_to_param for t in odd],
                           rtol=1e-6)
    assert not any(tag.endswith("/count") for tag in events.Tags()["scalars"])


def test_histograms_of_log10_eta(tmp_path):
    raws = _write(tmp_path, histogram_every=4)
    events = _load(tmp_path)
    for tensor, size in SIZES.items():
        series = events.Histograms(f"lr-Adam/pg1/{tensor}/log10_effective_lr")
        assert [h.step for h in series] == [1, 5]  # distributions on 1, 3, 5, 7; every 4 steps
        for h in series:
            log_eta = np.log10(raws[h.step]["pg1"].eta[tensor])
            value = h.histogram_value
            assert value.num == size == sum(value.bucket)
            assert value.min == pytest.approx(log_eta.min()) and value.max == pytest.approx(log_eta.max())
            assert value.sum / value.num == pytest.approx(log_eta.mean(), abs=0.02)
            limits = np.asarray(value.bucket_limit)
            assert np.all(np.diff(limits) > 0) and value.bucket[0] == 0
            # Counts up to each limit are exact up to the sketch's bucket width (1/64
            # relative): a value is never counted above its bin, at most one bucket below.
            below = np.cumsum(value.bucket)
            exact = np.sort(log_eta)
            assert np.all(np.searchsorted(exact, limits - 1e-9, side="left") <= below)
            assert np.all(below <= np.searchsorted(exact, limits + np.log10(1 + 1 / 64) + 1e-9,
                                                   side="right"))


def test_custom_scalars_layout(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _write(tmp_path)
    events = _load(tmp_path)
    config = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    tags = events.Tags()["scalars"]
    charts = {(c.title, chart.title): chart for c in layout.category for chart in c.chart}
    lr_chart = charts[("lr-Adam/pg0", "lr and step_size")]
    matched = sorted(t for t in tags for r in lr_chart.multiline.tag if re.search(r, t))
    assert matched == ["lr-Adam/pg0/lr", "lr-Adam/pg0/step_size"]
    band = charts[("lr-Adam/pg1", "effective lr p05-p50-p95")].margin.series[0]
    assert (band.value, band.lower, band.upper) == (
        "lr-Adam/pg1/effective_lr/p50", "lr-Adam/pg1/effective_lr/p05", "lr-Adam/pg1/effective_lr/p95")
    assert {band.value, band.lower, band.upper} <= set(tags)


def test_an_existing_torch_writer_is_used_and_left_open(tmp_path):
    pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    for t in (1, 2):
        sink.write(make_report(t)[0])
    sink.close()
    writer.add_scalar("mine", 1.0, global_step=3)  # still open
    writer.close()
    events = _load(tmp_path)
    assert [e.step for e in events.Scalars("lr-Adam/pg0/step_size")] == [1, 2]
    assert [e.value for e in events.Scalars("mine")] == [1.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_a_real_tensorboard_server_serves_the_series(tmp_path):
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.exists():
        pytest.skip("the tensorboard command is not installed")
    log_dir = tmp_path / "logs"
    _write(log_dir)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    wanted = "lr-Adam/pg1/step_size"
    with open(tmp_path / "tensorboard.log", "w") as log:
        server = subprocess.Popen(
            [str(tensorboard), "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            tags, deadline = {}, time.monotonic() + 120
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    tags = _get(f"{base}/data/plugin/scalars/tags")
                    if any(wanted in run_tags for run_tags in tags.values()):
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()[-2000:]
            runs = [run for run, run_tags in tags.items() if wanted in run_tags]
            assert runs == ["."], tags
            query = urllib.parse.urlencode({"run": ".", "tag": wanted})
            points = _get(f"{base}/data/plugin/scalars/scalars?{query}")
            assert [step for _, step, _ in points] == list(range(1, STEPS + 1))
            assert np.allclose([value for _, _, value in points],
                               [step_size_at(t, 1) for t in range(1, STEPS + 1)], rtol=1e-6)
            query = urllib.parse.urlencode({"run": ".", "tag": "lr-Adam/pg0/lr"})
            points = _get(f"{base}/data/plugin/scalars/scalars?{query}")
            assert np.allclose([v for _, _, v in points], [lr_at(t, 0) for t in range(1, STEPS + 1)],
                               rtol=1e-6)
            layout = _get(f"{base}/data/plugin/custom_scalars/layout")
            titles = {c["title"]: [chart["title"] for chart in c["chart"]] for c in layout["category"]}
            assert "lr and step_size" in titles["lr-Adam/pg0"]
            assert "effective lr p05-p50-p95" in titles["lr-Adam/pg1"]
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(20)
