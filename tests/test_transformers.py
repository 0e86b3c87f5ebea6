"""``lrscope.transformers.EffectiveLRCallback`` in a real Hugging Face ``Trainer`` run (a small
model defined here: nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

import lrscope.transformers  # noqa: E402
from lrscope.logs import read_jsonl  # noqa: E402

STEPS = 6


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 5, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i].sum(0, keepdim=True)}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_run_is_watched_through_accelerate(tmp_path, accumulate):
    """The Trainer's AdamW (inside accelerate's AcceleratedOptimizer) with its linear schedule:
    one report per real optimizer step, gradient accumulation included."""
    model = Regression()
    callback = lrscope.transformers.EffectiveLRCallback(every=5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
        weight_decay=0.1, gradient_accumulation_steps=accumulate, lr_scheduler_type="linear",
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])
    trainer.train()
    records = list(read_jsonl(tmp_path / "lrscope" / "lrscope.jsonl"))
    assert [r["t"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["optimizer"] == "AdamW" and not records[0]["notes"]
    for record in records:
        t, group = record["t"], record["groups"][0]
        lr = 1e-2 * (1 - (t - 1) / STEPS)  # the linear schedule's value the t-th step used
        assert group["lr"] == pytest.approx(lr)
        assert group["step_size"] == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
        assert (group["effective_lr"] is not None) == (t in (1, 6))
    names = {name for group in records[-1]["groups"] for name in group["params"]}
    assert "net.0.weight" in names
    optimizer = trainer.optimizer.optimizer
    eta = np.concatenate([(records[-1]["groups"][g]["lr"] / ((optimizer.state[p]["exp_avg_sq"] / (1 - 0.999**STEPS)).sqrt()
                                                           + 1e-8)).numpy().ravel()
                          for g, group in enumerate(optimizer.param_groups) for p in group["params"]])
    merged = lrscope.report.Distribution.union(
        [lrscope.report.Distribution.from_dict(g["effective_lr"]) for g in records[-1]["groups"]])
    assert merged.quantile(0.5) == pytest.approx(np.quantile(eta, 0.5), rel=0.01)
    assert callback.monitor is None and callback.last.t == STEPS
    assert list((tmp_path / "lrscope").glob("events.out.tfevents.*"))


def test_an_optimizer_lrscope_does_not_model_is_named_with_its_module(tmp_path):
    """The Trainer's own Adafactor (not torch.optim.Adafactor): the lr, and a warning that
    says which Adafactor."""
    callback = lrscope.transformers.EffectiveLRCallback(every=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
        optim="adafactor", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=[callback])
    with pytest.warns(RuntimeWarning, match=r"transformers\.optimization\.Adafactor is not a torch\.optim"):
        trainer.train()
    assert callback.last.groups[0].lr == pytest.approx(1e-2 / 2) and callback.last.groups[0].effective_lr is None


@pytest.fixture
def trackers_reset():
    """Whatever the test leaves, no W&B run stays active and MLflow's tracking URI is reset."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()
        sys.modules["wandb"].teardown()
    if "mlflow" in sys.modules:
        if sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run()
        sys.modules["mlflow"].set_tracking_uri(None)


def test_the_trainers_own_trackers_receive_lrscope_at_the_optimizer_step(tmp_path, monkeypatch, trackers_reset):
    """report_to=["tensorboard", "wandb", "mlflow"]: lrscope's scalars go into the Trainer's
    TensorBoard run, W&B run (offline) and MLflow run (local file store), at the Trainer's
    global_step, as its own TensorBoard sink receives them."""
    pytest.importorskip("tensorboard")
    from tests.test_trackers import _tensorboard

    report_to = ["tensorboard"]
    if importlib.util.find_spec("wandb"):
        report_to.append("wandb")
        for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)),
                            ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
            monkeypatch.setenv(name, value)
    if importlib.util.find_spec("mlflow"):
        report_to.append("mlflow")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    callback = lrscope.transformers.EffectiveLRCallback(every=5, log_dir=tmp_path / "lrscope")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
        gradient_accumulation_steps=2, report_to=report_to, use_cpu=True, save_strategy="no",
        logging_steps=2, disable_tqdm=True)
    trainer = transformers.Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=[callback])
    trainer.train()
    own, _, _ = _tensorboard(tmp_path / "lrscope")
    (run_dir,) = [path.parent for path in (tmp_path / "runs").rglob("events.out.tfevents.*")
                  if "lrscope" not in path.name]  # the Trainer's run, lrscope's events in it
    trainers, _, _ = _tensorboard(run_dir)
    assert set(trainers["train/loss"]) == {2, 4, 6}  # the Trainer's global_step
    lrscope_tags = {tag for tag in trainers if tag.startswith("lr-")}
    assert lrscope_tags == own.keys() and "lr-AdamW/pg0/step_size" in own
    for tag in lrscope_tags:
        assert trainers[tag] == own[tag]
    assert list(own["lr-AdamW/pg0/step_size"]) == list(range(1, STEPS + 1))
    if "wandb" in report_to:
        import wandb

        from tests._wandb_offline import history, offline_run_dir

        wandb.finish()
        wandb.teardown()
        rows = history(offline_run_dir(tmp_path))
        for tag, series in own.items():
            logged = {row["lrscope/t"]: row[tag] for row in rows if tag in row}
            assert logged.keys() == series.keys() and np.allclose(list(logged.values()), list(series.values()))
        assert {row["train/global_step"] for row in rows if "train/loss" in row} == {2, 4, 6}
    if "mlflow" in report_to:
        import mlflow

        from lrscope.sinks.mlflow import mlflow_name

        client = mlflow.tracking.MlflowClient(f"file:{tmp_path / 'mlruns'}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
        for tag, series in own.items():
            history = client.get_metric_history(run.info.run_id, mlflow_name(tag))
            assert {m.step: m.value for m in history}.keys() == series.keys()
            assert np.allclose([m.value for m in history], list(series.values()))


def test_report_to_false_leaves_the_trainers_trackers_out(tmp_path):
    pytest.importorskip("tensorboard")
    callback = lrscope.transformers.EffectiveLRCallback(log_dir=tmp_path / "lrscope", report_to=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=["tensorboard"],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    transformers.Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=[callback]).train()
    from tests.test_trackers import _tensorboard

    (run_dir,) = {path.parent for path in (tmp_path / "runs").rglob("events.out.tfevents.*")}
    assert not [tag for tag in _tensorboard(run_dir)[0] if tag.startswith("lr-")]


_TRACKIO_TRAINER = """
import json, sys
import transformers
import lrscope.transformers
from tests.test_transformers import STEPS, Data, Regression
from trackio.sqlite_storage import SQLiteStorage

out = sys.argv[1]
args = transformers.TrainingArguments(
    output_dir=out, max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
    report_to=["trackio"], project="lrscope-hf", trackio_static_space_id=False, use_cpu=True,
    save_strategy="no", logging_steps=2, disable_tqdm=True)
callback = lrscope.transformers.EffectiveLRCallback(every=5, log_dir=out + "/lrscope")
transformers.Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=[callback]).train()
(run,) = SQLiteStorage.get_runs("lrscope-hf")
json.dump(SQLiteStorage.get_logs("lrscope-hf", run), open(out + "/logs.json", "w"), default=str)
"""


def test_the_trainers_trackio_run_receives_lrscope(tmp_path):
    """report_to=["trackio"] (offline: trackio's local database, in a subprocess because
    TRACKIO_DIR is read once): every step's scalars, the last one included although the
    TrackioCallback finishes its run before this callback's on_train_end."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("pip install 'lrscope[trackio]'")
    from tests.test_trackers import _tensorboard

    subprocess.run([sys.executable, "-c", _TRACKIO_TRAINER, str(tmp_path)], check=True, timeout=300,
                   cwd=Path(__file__).parent.parent, capture_output=True,
                   env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONWARNINGS": "ignore"})
    rows = json.loads((tmp_path / "logs.json").read_text())
    own, _, _ = _tensorboard(tmp_path / "lrscope")
    assert list(own["lr-AdamW/pg0/step_size"]) == list(range(1, STEPS + 1))
    for tag, series in own.items():
        logged = {row["step"]: row[tag] for row in rows if tag in row}
        assert logged.keys() == series.keys(), tag
        assert np.allclose(list(logged.values()), list(series.values()), rtol=1e-6), tag
    # (The Trainer logs its rows at trackio's own step counter, with train/global_step in them.)
    assert {row["train/global_step"] for row in rows if "train/loss" in row} == {2, 4, 6}


def test_a_tracker_lrscope_cannot_write_into_costs_a_warning_not_the_training(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from lrscope.sinks import JsonlSink
    from lrscope.sinks.tensorboard import TensorBoardSink

    def broken(self, *args, **kwargs):
        raise OSError("read-only")

    monkeypatch.setattr(TensorBoardSink, "__init__", broken)
    callback = lrscope.transformers.EffectiveLRCallback(sinks=[JsonlSink(tmp_path / "own.jsonl")])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=["tensorboard"],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    with pytest.warns(RuntimeWarning, match="cannot write into the Trainer's TensorBoardCallback"):
        transformers.Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=[callback]).train()
    assert [r["t"] for r in read_jsonl(tmp_path / "own.jsonl")] == [1, 2]


DDP_STEPS = 4
DDP_BATCH = 4  # per process; the one-process run takes both processes' batches at once


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, their own labels (causal language modelling)."""

    def __init__(self):
        self.ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2_trainer(out: str, batch: int, **arguments):
    """A Trainer of a tiny GPT-2 built from its config (nothing downloaded), and its callback."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    callback = lrscope.transformers.EffectiveLRCallback(every=3)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=DDP_STEPS, per_device_train_batch_size=batch, learning_rate=1e-2,
        weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **arguments)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]), callback


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """One process of a torchrun-style launch: the Trainer sets up DDP (gloo) from the environment."""
    import os
    import pickle

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    trainer, callback = _gpt2_trainer(out, DDP_BATCH, ddp_backend="gloo")
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump({"last": callback.last, "world": trainer.args.world_size,
                     "ddp": type(trainer.model_wrapped).__name__}, handle)
    # As the other multi-process tests do: a process that exits with its gloo group alive can
    # abort in gloo's threads ("terminate called without an active exception", seen once in CI).
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_trainer_ddp_rank_zero_reports_the_one_process_run(tmp_path):
    """Two processes under the Trainer's DDP (gloo, CPU), each a batch of DDP_BATCH: process 0
    reports the same as one process with both batches at once, and alone writes logs."""
    import pickle
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True)
    ranks = [pickle.loads((tmp_path / "ddp" / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["ddp"] == "DistributedDataParallel"
    got = ranks[0]["last"]
    assert ranks[1]["last"] is None or not any("merged from" in n for n in ranks[1]["last"].notes)

    trainer, callback = _gpt2_trainer(str(tmp_path / "one"), 2 * DDP_BATCH)
    trainer.train()
    want = callback.last
    assert got.t == want.t == DDP_STEPS and any("merged from 2 ranks" in n for n in got.notes)
    assert len(got.groups) == len(want.groups) == 2  # the Trainer's decay / no-decay groups
    for mine, whole in zip(got.groups, want.groups):
        assert mine.lr == pytest.approx(whole.lr, rel=1e-12)
        assert mine.step_size == pytest.approx(whole.step_size, rel=1e-12)
        assert list(mine.params) == list(whole.params)  # the model's names, each once
        for name, param in [*whole.params.items(), ("group", whole)]:
            ours = mine if name == "group" else mine.params[name]
            a, b = ours.effective_lr, param.effective_lr
            assert a.count == b.count and a.eps_dominated_count == b.eps_dominated_count
            for q in (0.01, 0.5, 0.99):  # the gradients agree to float rounding, not bit for bit
                assert a.quantile(q) == pytest.approx(b.quantile(q), rel=0.02)
            assert (a.min, a.max, a.mean) == pytest.approx((b.min, b.max, b.mean), rel=1e-3)
            assert ours.update_norm == pytest.approx(param.update_norm, rel=1e-3)
            assert ours.param_norm == pytest.approx(param.param_norm, rel=1e-5)

    logs = tmp_path / "ddp" / "lrscope"
    assert [r["t"] for r in read_jsonl(logs / "lrscope.jsonl")] == list(range(1, DDP_STEPS + 1))
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1  # process 0's TensorBoard file only
