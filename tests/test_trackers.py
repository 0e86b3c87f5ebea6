"""The tracker sinks (W&B offline, MLflow's local file store, trackio's local database) receive what TensorBoard receives:
one real torch training watched by lrscope writes to all of them, and each is read back with
the tracker's own reader (W&B: its offline ``.wandb`` log; MLflow: ``MlflowClient``)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboardX", reason="pip install 'lrscope[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import lrscope  # noqa: E402
from lrscope.sinks import TensorBoardSink  # noqa: E402

STEPS = 6


def _train(sinks: list, steps: int = STEPS) -> lrscope.Monitor:
    """AdamW on two parameter groups, a warmup from lr 0 (a finding at step 1), distributions
    on steps 1, 3, 5."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()},
                                   {"params": model[2].parameters(), "lr": 3e-3}],
                                  lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, k / 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the findings' warnings)
        with lrscope.watch(optimizer, model=model, every=2, sinks=sinks) as monitor:
            for _ in range(steps):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                schedule.step()
    return monitor


def _tensorboard(log_dir: Path) -> tuple[dict, dict, dict]:
    """TensorBoard's scalars ``{tag: {step: value}}``, histograms ``{tag: {step: HistogramValue}}``
    and text ``{tag: {step: markdown}}``."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                           "tensors": 0}).Reload()
    tags = events.Tags()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags["scalars"]}
    histograms = {tag: {e.step: e.histogram_value for e in events.Histograms(tag)}
                  for tag in tags["histograms"]}
    texts = {tag.removesuffix("/text_summary"): {e.step: e.tensor_proto.string_val[0].decode()
                                                 for e in events.Tensors(tag)}
             for tag in tags["tensors"] if tag.endswith("findings/text_summary")}
    return scalars, histograms, texts


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'lrscope[wandb]'")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)),
                        ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # (its settings, WANDB_DIR included, are read once per setup)


def test_wandb_receives_what_tensorboard_receives(tmp_path, offline_wandb):
    from lrscope.sinks.wandb import WandbSink
    from tests._wandb_offline import history, metric_definitions, offline_run_dir

    monitor = _train([TensorBoardSink(tmp_path / "tb"), WandbSink(project="lrscope-test")])
    assert offline_wandb.run is None  # the sink started the run and finished it
    assert "warmup_starts_at_zero" in [f.id for f in monitor.findings]
    offline_wandb.teardown()  # (waits for W&B's service to write everything)
    scalars, histograms, texts = _tensorboard(tmp_path / "tb")
    run_dir = offline_run_dir(tmp_path)
    rows = [row for row in history(run_dir) if "lrscope/t" in row]
    assert [row["lrscope/t"] for row in rows] == list(range(1, STEPS + 1))
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("lr-") and "." not in key:  # (a table's or histogram's fields)
                logged.setdefault(key, {})[row["lrscope/t"]] = value
    assert logged.keys() == scalars.keys() and len(scalars) > 30
    for tag, series in scalars.items():
        assert logged[tag].keys() == series.keys(), tag
        assert np.allclose(list(logged[tag].values()), list(series.values()), rtol=1e-6), tag
    # Histograms: the same tags at the same steps, of the same elements, in log10 bins.
    logged_histograms = {key[:-len("._type")] for row in rows for key, value in row.items()
                         if key.endswith("._type") and value == "histogram"}
    assert logged_histograms == histograms.keys() and histograms
    for tag, series in histograms.items():
        by_step = {row["lrscope/t"]: row for row in rows if f"{tag}.values" in row}
        assert by_step.keys() == series.keys(), tag
        for t, row in by_step.items():
            bins, counts = row[f"{tag}.bins"], row[f"{tag}.values"]
            assert sum(counts) == series[t].num and len(bins) == len(counts) + 1
            # TensorBoard's buckets: upper edges after a lower edge, as an empty first bucket.
            assert np.allclose(bins, series[t].bucket_limit) and counts == series[t].bucket[1:]
    # Findings: a table at the step TensorBoard shows them.
    assert texts.keys() == {"lr-AdamW/findings"}
    assert [row["lrscope/t"] for row in rows if "lr-AdamW/findings._type" in row] == list(texts["lr-AdamW/findings"])
    assert all(row["lr-AdamW/findings._type"] == "table-file" for row in rows if "lr-AdamW/findings._type" in row)
    assert metric_definitions(run_dir)["lr-*"] == "lrscope/t"


def test_wandb_two_optimizers_and_user_rows_lose_nothing(tmp_path, offline_wandb):
    """Two optimizers each count t from 1 and the user's own logging advances W&B's step:
    logging at step=t would drop rows; lrscope/t as the x-axis keeps them all."""
    from lrscope.sinks.wandb import WandbSink
    from tests._wandb_offline import history, offline_run_dir

    run = offline_wandb.init(project="lrscope-test")
    sink = WandbSink()
    assert sink.run is run
    torch.manual_seed(0)
    generator, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    optimizers = [torch.optim.Adam(generator.parameters(), lr=1e-3),
                  torch.optim.Adam(critic.parameters(), lr=2e-3)]
    monitors = [lrscope.watch(o, sinks=[sink], name=name) for o, name in zip(optimizers, ("G", "D"))]
    for step in range(1, 4):
        for optimizer in optimizers:
            optimizer.zero_grad()
            critic(generator(torch.randn(4, 3))).mean().backward()
            optimizer.step()
        run.log({"loss": float(step)}, step=10 * step)  # the user's own rows, far ahead
    for monitor in monitors:
        monitor.close()
    sink.close()
    assert offline_wandb.run is run  # the user's run stays open
    run.finish()
    offline_wandb.teardown()  # (waits for W&B's service to write everything)
    rows = history(offline_run_dir(tmp_path))
    for name, lr in (("lr-G", 1e-3), ("lr-D", 2e-3)):
        mine = [row for row in rows if f"{name}/pg0/lr" in row]
        assert [row["lrscope/t"] for row in mine] == [1, 2, 3]
        for row in mine:
            t = row["lrscope/t"]
            assert row[f"{name}/pg0/step_size"] == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
    assert [row["loss"] for row in rows if "loss" in row] == [1.0, 2.0, 3.0]


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """MLflow on a local file store (MLflow 3.7+ asks MLFLOW_ALLOW_FILE_STORE to use one)."""
    mlflow = pytest.importorskip("mlflow", reason="pip install 'lrscope[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_mlflow_receives_what_tensorboard_receives(tmp_path, local_mlflow):
    mlflow = local_mlflow
    from lrscope.sinks.mlflow import MlflowSink, mlflow_name

    sink = MlflowSink()
    monitor = _train([TensorBoardSink(tmp_path / "tb"), sink])
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"  # the sink created the run and ended it
    scalars, _, texts = _tensorboard(tmp_path / "tb")
    assert run.data.metrics.keys() == {mlflow_name(tag) for tag in scalars} and len(scalars) > 30
    for tag, series in scalars.items():
        history = client.get_metric_history(sink.run_id, mlflow_name(tag))
        assert [m.step for m in history] == list(series), tag
        assert np.allclose([m.value for m in history], list(series.values()), rtol=1e-6), tag
    assert texts.keys() == {"lr-AdamW/findings"}
    path = client.download_artifacts(sink.run_id, "lrscope/lr-AdamW/findings.md", str(tmp_path))
    text = Path(path).read_text()
    assert text.startswith("## Step ") and "warmup_starts_at_zero" in [f.id for f in monitor.findings]
    for t, markdown in texts["lr-AdamW/findings"].items():
        assert f"## Step {t}\n\n{markdown}" in text


def test_mlflow_writes_into_the_active_run_and_leaves_it_open(local_mlflow):
    mlflow = local_mlflow
    from lrscope.sinks.mlflow import MlflowSink

    with mlflow.start_run() as run:
        sink = MlflowSink()
        assert sink.run_id == run.info.run_id
        _train([sink], steps=2)
        assert mlflow.active_run().info.run_id == run.info.run_id
        mlflow.log_metric("loss", 1.0, step=2)
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "lr-AdamW/pg1/lr")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([0.0, 1e-3])


@pytest.mark.parametrize("module, cls, extra", [("lrscope.sinks.wandb", "WandbSink", "wandb"),
                                                ("lrscope.sinks.mlflow", "MlflowSink", "mlflow"),
                                                ("lrscope.sinks.trackio", "TrackioSink", "trackio")])
def test_a_missing_tracker_names_the_extra(monkeypatch, module, cls, extra):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, extra, None)  # import wandb / mlflow fails
    sink_class = getattr(importlib.import_module(module), cls)
    with pytest.raises(ImportError, match=rf"pip install 'lrscope\[{extra}\]'"):
        sink_class()


_TRACKIO_RUN = """
import json, sys
from lrscope.sinks import TensorBoardSink
from lrscope.sinks.trackio import TrackioSink
from tests.test_trackers import _train
from trackio.sqlite_storage import SQLiteStorage

_train([TensorBoardSink(sys.argv[1]), TrackioSink(project="lrscope", name="run", auto_log_cpu=False)])
json.dump(SQLiteStorage.get_logs("lrscope", "run"), open(sys.argv[2], "w"), default=str)
"""


def test_trackio_receives_what_tensorboard_receives(tmp_path):
    """trackio offline (its local SQLite database in TRACKIO_DIR, read once at its import:
    the run is a subprocess), read back with trackio's own SQLiteStorage."""
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("trackio") is None:  # (not imported here: TRACKIO_DIR is read once)
        pytest.skip("pip install 'lrscope[trackio]'")
    subprocess.run([sys.executable, "-c", _TRACKIO_RUN, str(tmp_path / "tb"), str(tmp_path / "logs.json")],
                   check=True, cwd=Path(__file__).parent.parent, timeout=300, capture_output=True,
                   env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONWARNINGS": "ignore"})
    rows = json.loads((tmp_path / "logs.json").read_text())
    scalars, histograms, texts = _tensorboard(tmp_path / "tb")
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("lr-") and isinstance(value, (int, float)):
                logged.setdefault(key, {})[row["step"]] = value
    assert logged.keys() == scalars.keys() and len(scalars) > 30
    for tag, series in scalars.items():
        assert logged[tag].keys() == series.keys(), tag
        assert np.allclose(list(logged[tag].values()), list(series.values()), rtol=1e-6), tag
    assert histograms and texts.keys() == {"lr-AdamW/findings"}
    for tag, series in histograms.items():
        by_step = {row["step"]: row[tag] for row in rows if tag in row}
        assert by_step.keys() == series.keys(), tag
        for t, histogram in by_step.items():
            assert histogram["_type"] == "trackio.histogram"
            assert np.allclose(histogram["bins"], series[t].bucket_limit)
            assert histogram["values"] == series[t].bucket[1:]
    for tag, series in texts.items():
        assert {row["step"]: row[tag]["_value"] for row in rows if tag in row} == series


def test_importing_the_sinks_imports_no_tracker():
    import subprocess
    import sys

    code = ("import sys, lrscope.sinks; from lrscope.sinks import MlflowSink, TrackioSink, WandbSink; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
