"""``lrscope.lightning.EffectiveLRMonitor`` in real Lightning training runs, logged through the
trainer's own loggers (read back from CSVLogger's metrics.csv)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

pytest.importorskip("lightning")
import lightning  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import lrscope.lightning  # noqa: E402
from lrscope.sinks import JsonlSink  # noqa: E402
from lrscope.logs import read_jsonl  # noqa: E402

STEPS = 6


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                       batch_size=8)


class Regression(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 / (1 + k))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TwoOptimizers(Regression):
    """GAN-like manual optimization: two Adams, stepped alternately."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, index):
        for optimizer in self.optimizers():
            loss = super().training_step(batch, index)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.net[0].parameters(), lr=1e-3),
                torch.optim.Adam(self.net[2].parameters(), lr=2e-3))


def _fit(module, tmp_path, callback) -> list[dict]:
    trainer = lightning.Trainer(max_steps=STEPS, callbacks=[callback], logger=CSVLogger(tmp_path),
                                accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, _data())
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        return [row for row in csv.DictReader(f) if any(k.startswith("lr-") and v for k, v in row.items())]


def test_trainer_loggers_receive_the_step_really_taken(tmp_path):
    module = Regression()
    callback = lrscope.lightning.EffectiveLRMonitor(every=5, sinks=[JsonlSink(tmp_path / "own.jsonl")])
    rows = _fit(module, tmp_path, callback)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for t, row in enumerate(rows, start=1):
        lr = 1e-2 / t  # the LambdaLR value the t-th step used
        assert float(row["lr-AdamW/pg0/lr"]) == pytest.approx(lr)
        assert float(row["lr-AdamW/pg0/step_size"]) == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
        assert float(row["lr-AdamW/pg0/weight_decay_rate"]) == pytest.approx(lr * 0.1)
        assert bool(row["lr-AdamW/pg0/effective_lr/p50"]) == (t in (1, 6))
    # eta of the last step, from the optimizer's state after training.
    optimizer = module.trainer.optimizers[0]
    eta = np.concatenate([(1e-2 / STEPS / ((s["exp_avg_sq"] / (1 - 0.999**STEPS)).sqrt() + 1e-8)).numpy().ravel()
                          for s in optimizer.state.values()])
    assert float(rows[-1]["lr-AdamW/pg0/effective_lr/p50"]) == pytest.approx(np.quantile(eta, 0.5), rel=0.01)
    assert float(rows[-1]["lr-AdamW/pg0/effective_lr/max"]) == pytest.approx(eta.max(), rel=1e-6)
    # The callback's own sink got the same steps, and it is closed once training ended.
    assert [r["t"] for r in read_jsonl(tmp_path / "own.jsonl")] == list(range(1, STEPS + 1))
    assert callback.monitors == []


def test_two_optimizers_are_named_like_learning_rate_monitor(tmp_path):
    rows = _fit(TwoOptimizers(), tmp_path, lrscope.lightning.EffectiveLRMonitor(every=1))
    for name, lr in (("lr-Adam", 1e-3), ("lr-Adam-1", 2e-3)):
        logged = {int(r["step"]): r for r in rows if r[f"{name}/pg0/step_size"]}
        assert sorted(logged) == [1, 2, 3]  # six optimizer steps: three each
        for t, row in logged.items():
            assert float(row[f"{name}/pg0/step_size"]) == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
            assert row[f"{name}/pg0/effective_lr/p50"]


def test_lrscope_plot_reads_a_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from lrscope import plot

    trainer = lightning.Trainer(max_steps=STEPS, callbacks=[lrscope.lightning.EffectiveLRMonitor(every=5)],
                                logger=TensorBoardLogger(tmp_path), accelerator="cpu", enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(), _data())
    run = plot.load(trainer.logger.log_dir)
    assert run.groups["lr-AdamW/pg0"]["step_size"].steps.tolist() == list(range(1, STEPS + 1))
    assert run.groups["lr-AdamW/pg0"]["effective_lr/p50"].steps.tolist() == [1, 6]


class LoggedAtGlobalStep(TwoOptimizers):
    """Two optimizers, manual optimization, each loss logged at the trainer's global_step."""

    def training_step(self, batch, index):
        for number, optimizer in enumerate(self.optimizers()):
            loss = Regression.training_step(self, batch, index)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.logger.log_metrics({f"loss{number}": loss.item()}, step=self.global_step)


@pytest.mark.parametrize("x_axis", ["t", "global_step"])
def test_global_step_lines_up_with_metrics_logged_at_it(tmp_path, x_axis):
    trainer = lightning.Trainer(max_steps=STEPS, logger=CSVLogger(tmp_path), accelerator="cpu",
                                callbacks=[lrscope.lightning.EffectiveLRMonitor(every=1, x_axis=x_axis)],
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(LoggedAtGlobalStep(), _data())
    assert trainer.global_step == STEPS  # six optimizer steps, three each
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def steps(column: str) -> list[int]:
        return sorted(int(row["step"]) for row in rows if row.get(column))

    assert steps("loss0") == [1, 3, 5] and steps("loss1") == [2, 4, 6]
    if x_axis == "global_step":
        assert steps("lr-Adam/pg0/step_size") == steps("loss0")
        assert steps("lr-Adam-1/pg0/step_size") == steps("loss1")
    else:  # each optimizer's own t: the users' metrics do not line up
        assert steps("lr-Adam/pg0/step_size") == steps("lr-Adam-1/pg0/step_size") == [1, 2, 3]
    # The values are those of each optimizer's own t, whatever the axis.
    for name, lr in (("lr-Adam", 1e-3), ("lr-Adam-1", 2e-3)):
        values = [float(row[f"{name}/pg0/step_size"]) for row in rows if row.get(f"{name}/pg0/step_size")]
        assert values == pytest.approx([lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) for t in (1, 2, 3)])


def test_an_unknown_x_axis_is_an_error():
    with pytest.raises(ValueError, match="x_axis must be one of 't', 'global_step'"):
        lrscope.lightning.EffectiveLRMonitor(x_axis="epoch")


def test_global_step_in_automatic_optimization_is_the_optimizer_step(tmp_path):
    """One optimizer, gradients accumulated over two batches: global_step counts optimizer steps,
    as t does."""
    trainer = lightning.Trainer(max_steps=3, logger=CSVLogger(tmp_path), accelerator="cpu",
                                callbacks=[lrscope.lightning.EffectiveLRMonitor(every=1, x_axis="global_step")],
                                accumulate_grad_batches=2, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(Regression(), _data())
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-AdamW/pg0/step_size")]
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["lr-AdamW/pg0/step_size"]) == pytest.approx(1e-2 / 3 * math.sqrt(1 - 0.999**3) / (1 - 0.9**3))
