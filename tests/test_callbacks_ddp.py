"""The Lightning callback under Lightning's DDP strategy on two CPU processes: it watches on
every rank and rank 0 logs the whole model, once per step."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")
import lightning  # noqa: E402
import torch  # noqa: E402

import lrscope.lightning  # noqa: E402
from lrscope.logs import read_jsonl  # noqa: E402
from tests.test_lightning import Regression, _data  # noqa: E402

STEPS = 4


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_lightning_ddp_rank_zero_logs_the_whole_model(tmp_path):
    callback = lrscope.lightning.EffectiveLRMonitor(every=2, log_dir=tmp_path, loggers=False)
    trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS,
                                callbacks=[callback], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(), _data())
    records = list(read_jsonl(tmp_path / "lrscope.jsonl"))
    assert [r["t"] for r in records] == list(range(1, STEPS + 1))  # rank 0 alone wrote
    total = sum(p.numel() for p in Regression().parameters())
    measured = [r for r in records if r["groups"][0]["effective_lr"] is not None]
    assert [r["t"] for r in measured] == [1, 3]
    for record in measured:
        group = record["groups"][0]
        assert group["effective_lr"]["count"] == total  # the whole model, each element once
        assert sorted(group["params"]) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
        assert any("merged from 2 ranks" in note for note in record["notes"])
