"""Schedules against torch's own schedulers, and the `lrscope curve` command."""

from __future__ import annotations

import csv
import math
import os
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
    (["curve", "yogi", "--framework", "torch"], "'yogi' does not exist in torch"),
    (["curve", "adam", "--lr=-1e-3"], "lr must be finite and >= 0, got -0.001"),
    (["curve", "adam", "--lr", "nan"], "lr must be finite and >= 0, got nan"),
    (["curve", "adam", "--eps=-1"], "eps must be finite and >= 0, got -1.0"),
    (["curve", "adam", "--schedule", "step", "--every", "0"], "--every must be >= 1, got 0"),
    (["curve", "adam", "--schedule", "warmup", "--warmup=-3"], "--warmup must be >= 0, got -3"),
    (["curve", "adam", "--schedule", "step", "--gamma", "0"], "--gamma must be finite and > 0"),
    (["curve", "adam", "--schedule", "cosine", "--min-lr=-1"], "--min-lr must be finite and >= 0"),
    (["curve", "adam", "--set", "betas=0.9"], "betas must be a pair (beta1, beta2), got 0.9"),
    (["curve", "adam", "--set", "betas=0.9,0.99,0.5"], "betas must be a pair (beta1, beta2)"),
    (["curve", "adam", "--set", "eps=abc"], "--set eps=abc: the value must be a number"),
    (["curve", "adam", "--set", "lr=1" + "0" * 400], "lr must be finite and >= 0, got inf"),
    (["curve", "adam", "--set", "lr"], "--set expects KEY=VALUE, got 'lr'"),
    (["curve", "adam", "--steps", str(10**12)], "--steps must be <= 1000000000, got 1000000000000"),
    (["curve", "adam", "--steps", "9" * 400], "--steps must be <= 1000000000"),
    (["curve", "adam", "--schedule", "warmup", "--warmup", "9" * 30], "--warmup must be <= 1000000000"),
    (["curve", "adam", "--csv", "/nonexistent/dir/a.csv"], "cannot write /nonexistent/dir/a.csv"),
    (["curve", "adam", "--png", "/nonexistent/dir/a.png"], "cannot write /nonexistent/dir/a.png"),
    (["curve", "adam", "--png", "/tmp"], "/tmp is a directory; name a file"),
    (["curve", "adam", "--png", "curve.svg"], "curve.svg names a .svg file, but this writes PNG"),
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


def test_every_beyond_any_step_is_no_decay(tmp_path, capsys):
    out = tmp_path / "a.csv"
    assert main(["curve", "adam", "--steps", "50", "--schedule", "step", "--every",
                 "99999999999999999999", "--csv", str(out)]) == 0
    assert {row["lr"] for row in csv.DictReader(out.open())} == {"0.001"}


def test_unwritable_or_linked_outputs_are_one_line_errors(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "link.csv").symlink_to(outside)
    (tmp_path / "dir.csv").mkdir()
    for option, name, message in (("--csv", "link.csv", "symbolic link"), ("--png", "dir.csv", "")):
        code = main(["curve", "adam", "--steps", "20", option, str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert outside.read_text() == "keep me"
    os.chmod(tmp_path, 0o500)  # a directory nobody may write to
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        assert main(["curve", "adam", "--steps", "20", "--csv", str(tmp_path / "new.csv")]) == 2
        assert capsys.readouterr().err.startswith(f"lrscope curve: error: cannot write {tmp_path / 'new.csv'}")
    finally:
        os.chmod(tmp_path, 0o700)


def test_long_curves_are_computed_in_chunks_with_bounded_memory(tmp_path, capsys, monkeypatch):
    """The CSV streams chunk by chunk; the table, the facts (the dip, 99 % of lr) and the
    PNG come from the chunks: the same as in one piece, memory bounded by the chunk."""
    import tracemalloc

    from lrscope import curve_command

    for optimizer, facts in (("nadam", "stays below 99% of lr"), ("adam", "first reaches 99% of lr")):
        args = ["curve", optimizer, "--steps", "30000", "--schedule", "cosine", "--warmup", "2000",
                "--framework", "torch,keras"]
        monkeypatch.setattr(curve_command, "CHUNK", 1 << 18)
        assert main([*args, "--csv", str(tmp_path / "one.csv")]) == 0
        whole = capsys.readouterr().out
        monkeypatch.setattr(curve_command, "CHUNK", 777)
        assert main([*args, "--csv", str(tmp_path / "chunks.csv"), "--png", str(tmp_path / "c.png")]) == 0
        chunked = capsys.readouterr().out
        assert chunked.replace(f"wrote {tmp_path / 'chunks.csv'}", f"wrote {tmp_path / 'one.csv'}").replace(
            f"\nwrote {tmp_path / 'c.png'}", "") == whole
        assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "chunks.csv").read_bytes()
        assert facts in whole and (optimizer == "nadam" or "dip: alpha_t/lr = 0.1522 at t = 12" in whole)
    monkeypatch.setattr(curve_command, "CHUNK", 4096)
    tracemalloc.start()
    try:
        assert main(["curve", "adam", "--steps", "400000", "--csv", str(tmp_path / "long.csv")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000  # 40 bytes a step were 16 MB
    with open(tmp_path / "long.csv") as handle:
        assert sum(1 for _ in handle) == 400_001


def test_a_png_of_many_steps_is_downsampled(tmp_path, capsys):
    assert main(["curve", "adam", "--steps", "3000000", "--png", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha_t first reaches 99% of lr at t = " in capsys.readouterr().out


@pytest.mark.parametrize("call,message", [
    (lambda: lrscope.step_size("adam", 1.5), "t must be a whole number >= 1, got 1.5"),
    (lambda: lrscope.step_size("adam", True), "t must be a whole number >= 1, got True"),
    (lambda: lrscope.step_size("adam", 10**30), "t must be a whole number >= 1 and < 2\\*\\*63"),
    (lambda: lrscope.step_size("adam", "3"), "t must be a whole number >= 1, got '3'"),
    (lambda: lrscope.step_size("adam", 1, betas=0.9), r"betas must be a pair \(beta1, beta2\), got 0.9"),
    (lambda: lrscope.step_size("adam", 1, betas=(0.9,)), r"betas must be a pair"),
    (lambda: lrscope.step_size("adam", 1, betas=("a", "b")), r"beta1 must be a number"),
    (lambda: lrscope.step_size_curve("adam", 2.5), "steps must be a whole number >= 1, got 2.5"),
    (lambda: lrscope.step_size_curve("adam", 10**30), "steps must be a whole number >= 1 and < 2\\*\\*63"),
])
def test_offline_step_sizes_refuse_bad_t_and_betas(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_offline_step_sizes_accept_numpy_integers():
    assert lrscope.step_size("adam", np.int64(3)) == lrscope.step_size("adam", 3)
    assert lrscope.step_size_curve("adam", np.int32(3)).shape == (3,)


_VALUES = ["abc", "nan", "-1", "1e400", "0.9,0.99", "true", "1" + "0" * 30]


@pytest.mark.parametrize("name", sorted(lrscope.formulas.FAMILIES))
def test_any_set_value_gives_a_curve_or_a_one_line_error(name, capsys):
    """Every hyperparameter of every family, set to a bad value: exit 0 or 2, never a
    traceback, and an error is one line."""
    from lrscope import formulas

    convention = formulas.default_convention(name)
    for key in [*formulas.family(name).DEFAULTS[convention], "betas"]:
        for value in _VALUES:
            code = main(["curve", name, "--framework", convention, "--steps", "5", "--set", f"{key}={value}"])
            err = capsys.readouterr().err
            assert code in (0, 2), (key, value)
            assert code == 0 or (err.count("\n") == 1 and err.startswith("lrscope curve: error: ")), (key, value, err)
