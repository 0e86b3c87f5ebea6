"""Schedules against torch's own schedulers, and the `lrscope curve` command."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest

import lrscope
from lrscope import schedules
from lrscope.cli import main


def torch_lrs(make_scheduler, steps, lr):
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the coming optimizer.step() uses
        opt.step()
        scheduler.step()
    return np.array(lrs)


def test_schedules_match_torch_schedulers():
    torch = pytest.importorskip("torch")
    S = torch.optim.lr_scheduler
    k = np.arange(200)
    pairs = [
        (schedules.step(0.1, every=30, gamma=0.5), lambda o: S.StepLR(o, 30, 0.5)),
        (schedules.exponential(0.1, gamma=0.98), lambda o: S.ExponentialLR(o, 0.98)),
        (schedules.onecycle(0.1, steps=200), lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=200)),
        (schedules.warmup(0.1, warmup=20), lambda o: S.LambdaLR(o, lambda i: min(1.0, (i + 1) / 20))),
    ]
    for mine, make in pairs:
        np.testing.assert_allclose(mine(k), torch_lrs(make, 200, 0.1), rtol=1e-9, atol=1e-15)


def test_cosine_with_warmup_closed_form():
    lr, steps, warmup = 1e-3, 100, 10
    got = schedules.cosine(lr, steps=steps, warmup=warmup)(np.arange(steps))
    for k in range(steps):
        if k < warmup:
            expected = lr * (k + 1) / warmup
        else:
            expected = lr * 0.5 * (1 + math.cos(math.pi * (k - warmup + 1) / (steps - warmup)))
        assert got[k] == pytest.approx(expected, abs=1e-15)


def test_curve_uses_schedule_at_t_minus_one():
    curve = lrscope.step_size_curve("adam", 5, lr=lambda k: 1e-3 * 0.5**k)
    for t in range(1, 6):
        lr = 1e-3 * 0.5 ** (t - 1)
        assert curve[t - 1] == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))


def test_curve_command_table_csv_png(tmp_path, capsys):
    out_csv, out_png = tmp_path / "a.csv", tmp_path / "a.png"
    code = main(["curve", "adam", "--lr", "1e-3", "--steps", "10000", "--csv", str(out_csv),
                 "--png", str(out_png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "alpha_1/lr = 0.3162" in text
    assert "dip: alpha_t/lr = 0.1522 at t = 12" in text  # min of sqrt(1-0.999^t)/(1-0.9^t)
    reach = next(t for t in range(1, 10001) if math.sqrt(1 - 0.999**t) / (1 - 0.9**t) >= 0.99)
    assert f"first reaches 99% of lr at t = {reach}" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 10000 and list(rows[0]) == ["t", "lr", "step_size"]
    assert float(rows[9]["step_size"]) == pytest.approx(1e-3 * math.sqrt(1 - 0.999**10) / (1 - 0.9**10))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_command_frameworks_side_by_side(tmp_path, capsys):
    out_csv = tmp_path / "n.csv"
    assert main(["curve", "nadam", "--lr", "1e-3", "--steps", "50", "--framework", "torch,keras,optax",
                 "--schedule", "cosine", "--warmup", "5", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    for framework in ("torch", "keras", "optax"):
        assert f"{framework}: alpha_1/lr" in text
    header = next(csv.reader(out_csv.open()))
    assert "step_size_grad_keras" in header and "lr_optax" in header


@pytest.mark.parametrize("args,message", [
    (["curve", "adamz"], "unknown optimizer 'adamz'; choose one of"),
    (["curve", "adam", "--betas", "0.9", "1.5"], "beta2 must be in [0, 1)"),
    (["curve", "adam", "--steps", "0"], "--steps must be >= 1"),
    (["curve", "adam", "--schedule", "linear"], "invalid choice: 'linear' (choose from"),
    (["curve", "adam", "--framework", "mxnet"], "choose from torch, keras, tf1, optax"),
    (["curve", "lion", "--framework", "torch"], "'lion' does not exist in torch"),
    (["curve", "adam", "--lr=-1e-3"], "lr must be finite and >= 0, got -0.001"),
    (["curve", "adam", "--lr", "nan"], "lr must be finite and >= 0, got nan"),
    (["curve", "adam", "--eps=-1"], "eps must be finite and >= 0, got -1.0"),
    (["curve", "adam", "--schedule", "step", "--every", "0"], "--every must be >= 1, got 0"),
    (["curve", "adam", "--schedule", "warmup", "--warmup=-3"], "--warmup must be >= 0, got -3"),
    (["curve", "adam", "--schedule", "step", "--gamma", "0"], "--gamma must be finite and > 0"),
    (["curve", "adam", "--schedule", "cosine", "--min-lr=-1"], "--min-lr must be finite and >= 0"),
])
def test_bad_input_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "lrscope.cli", "curve", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "choose one of" in result.stderr


@pytest.mark.parametrize("call", [
    lambda: lrscope.step_size("adam", 1, lr=-1e-3),
    lambda: lrscope.step_size_curve("adam", 3, eps=float("nan")),
    lambda: lrscope.step_size_curve("sgd", 3, lr=float("inf")),
])
def test_offline_step_sizes_refuse_a_negative_or_non_finite_lr_or_eps(call):
    with pytest.raises(ValueError, match=r"(lr|eps) must be finite and >= 0"):
        call()
