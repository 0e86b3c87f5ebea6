"""``lrscope demo``: a short real run writes TensorBoard, JSONL and a PNG."""

from __future__ import annotations

import math

import pytest

from lrscope.cli import main
from lrscope.logs import read_jsonl

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("tensorboardX")
pytest.importorskip("matplotlib")


def test_a_short_demo_run(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "lrscope.jsonl").write_text('{"t": 99, "groups": []}\n')  # a previous run's log
    assert main(["demo", "--steps", "30", "--every", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out}" in printed
    assert str(out / "lrscope.png") in printed
    assert (out / "lrscope.png").stat().st_size > 10_000
    assert list(out.glob("events.out.tfevents.*"))
    records = list(read_jsonl(out / "lrscope.jsonl"))
    assert [r["t"] for r in records] == list(range(1, 31))
    assert {g["name"] for g in records[0]["groups"]} == {"decay", "no_decay"}
    for record in records:
        t = record["t"]
        for group in record["groups"]:
            expected = group["lr"] * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            assert group["step_size"] == pytest.approx(expected, rel=1e-9)
            assert (group["effective_lr"] is not None) == (t in (1, 11, 21))
    decay = records[0]["groups"][0]
    assert decay["weight_decay_rate"] == pytest.approx(decay["lr"] * 0.05)
    # Three digit pixels are blank in every image: their first-layer weights never get a
    # gradient, so 3 of the 64 inputs of "0.weight" are eps-dominated.
    assert decay["params"]["0.weight"]["effective_lr"]["eps_dominated"] == pytest.approx(3 / 64)


def test_bad_options_are_one_line_errors(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err


def test_an_unwritable_out_fails_before_training(tmp_path, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert main(["demo", "--out", str(not_a_directory / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "cannot write to --out" in captured.err
    assert "step" not in captured.out  # no training table: it stopped before training
