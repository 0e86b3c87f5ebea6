"""Sinks: JSONL, CSV, console, the background writer, and failures that must not stop training."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from lrscope.logs import read_jsonl
from lrscope.sinks import SinkGroup
from lrscope.sinks.console import ConsoleSink
from lrscope.sinks.csv import CsvSink
from lrscope.sinks.defaults import default_sinks
from lrscope.sinks.jsonl import JsonlSink
from lrscope.sinks.tensorboard import TensorBoardSink
from tests._sink_reports import WEIGHT_DECAY, Collect, lr_at, make_report, step_size_at

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _close(rel: float, expected: float, tol: float = 0.01) -> bool:
    return abs(rel / expected - 1) <= tol


def test_jsonl_records_match_the_data(tmp_path):
    path = tmp_path / "run" / "lrscope.jsonl"
    sink = JsonlSink(path)
    raws = {}
    for t in range(1, 6):
        report, raws[t] = make_report(t, distributions=t % 2 == 1)
        sink.write(report)
    sink.close()
    records = list(read_jsonl(path))
    assert [r["t"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        t = record["t"]
        assert isinstance(record["wall_time"], float) and record["optimizer"] == "Adam"
        for index, group in enumerate(record["groups"]):
            assert group["name"] == f"pg{index}"
            assert group["lr"] == pytest.approx(lr_at(t, index), rel=1e-15)
            assert group["step_size"] == pytest.approx(step_size_at(t, index), rel=1e-15)
            assert group["weight_decay_rate"] == pytest.approx(lr_at(t, index) * WEIGHT_DECAY)
            if t % 2 == 0:
                assert group["effective_lr"] is None
                continue
            raw = raws[t][group["name"]]
            eta = raw.all_eta
            for key, q in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95)):
                assert _close(group["effective_lr"][key], np.quantile(eta, q))
            assert group["effective_lr"]["min"] == eta.min()
            assert group["effective_lr"]["max"] == eta.max()
            assert group["effective_lr"]["eps_dominated"] == pytest.approx(
                sum(raw.eps_counts.values()) / eta.size)
            assert group["update_to_param"] == pytest.approx(raw.update_to_param, rel=1e-12)
            assert set(group["params"]) == {"layer0.weight", "layer1.bias"}


def test_jsonl_is_strict_json(tmp_path):
    """Non-finite numbers (empty distributions, zero parameters) are written as null."""
    report, _ = make_report(1)
    report.groups[0].param_norm = 0.0  # update_to_param = inf
    report.groups[1].lr = math.nan
    sink = JsonlSink(tmp_path / "x.jsonl")
    sink.write(report)
    sink.close()
    line = (tmp_path / "x.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert record["groups"][0]["update_to_param"] is None
    assert record["groups"][1]["lr"] is None


def test_jsonl_without_tensor_sketches(tmp_path):
    """tensor_sketches=False: every tensor keeps its summary, only the groups keep sketches,
    and lrscope plot reads the file the same."""
    from lrscope import plot
    from lrscope.report import Distribution

    report, _ = make_report(1)
    for name, tensor_sketches in (("all", True), ("groups", False)):
        sink = JsonlSink(tmp_path / name / "lrscope.jsonl", tensor_sketches=tensor_sketches)
        sink.write(report)
        sink.close()
    full, lean = (next(read_jsonl(tmp_path / name / "lrscope.jsonl")) for name in ("all", "groups"))
    assert len(json.dumps(lean)) < len(json.dumps(full))
    for group, a, b in zip(report.groups, full["groups"], lean["groups"]):
        assert a["effective_lr"] == b["effective_lr"]  # the group's sketch stays
        assert Distribution.from_dict(b["effective_lr"]).quantile(0.5) == group.effective_lr.quantile(0.5)
        assert a["params"].keys() == b["params"].keys()
        for tensor, entry in a["params"].items():
            summary = {k: v for k, v in entry["effective_lr"].items() if k != "sketch"}
            assert b["params"][tensor]["effective_lr"] == summary
    assert plot.load(tmp_path / "all").groups.keys() == plot.load(tmp_path / "groups").groups.keys()


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from lrscope.report import Distribution, GroupReport, StepReport
    from lrscope.sinks import SinkGroup
    from lrscope.sinks.jsonl import JsonlSink
    from lrscope.sinks.tensorboard import TensorBoardSink

    eta = Distribution.from_array(np.geomspace(1e-6, 1e2, 20_000), 3)
    extra = [TensorBoardSink(sys.argv[3])] if len(sys.argv) > 3 else []
    sinks = SinkGroup([JsonlSink(sys.argv[1]), *extra])
    steps = int(sys.argv[2])
    t = 0
    while steps == 0 or t < steps:
        t += 1
        group = GroupReport(name="pg0", lr=1e-3, step_size=1e-3 * t, effective_lr=eta)
        sinks.write(StepReport(t=t, optimizer="Adam", framework="torch", family="adam",
                               groups=[group]))
""")


def _run_writer(path: Path, steps: int, *tensorboard_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(steps),
                             *map(str, tensorboard_dir)], env=env)


def test_a_killed_process_leaves_every_complete_line_readable(tmp_path):
    path = tmp_path / "lrscope.jsonl"
    process = _run_writer(path, steps=0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_bytes().count(b"\n") >= 40:
                break
            time.sleep(0.05)
        process.kill()  # SIGKILL: no atexit, no flush
    finally:
        process.kill()
        process.wait(30)
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    assert len(complete) >= 40
    parsed = [json.loads(line) for line in complete]  # every complete line is valid JSON
    assert [r["t"] for r in parsed] == list(range(1, len(parsed) + 1))
    assert [r["t"] for r in read_jsonl(path)] == [r["t"] for r in parsed]  # torn tail skipped
    assert not torn or torn.startswith(b"{")


def test_two_processes_appending_to_one_log_keep_every_line_whole(tmp_path):
    """Two writers of one JSONL file (two monitors given one log directory, or every rank
    of a distributed run): lines of some 14 KB, each appended in one system call, never
    split each other."""
    path = tmp_path / "lrscope.jsonl"
    writers = [_run_writer(path, 300) for _ in range(2)]
    assert [w.wait(120) for w in writers] == [0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and min(map(len, lines[:-1])) > 8192  # more than a write buffer
    steps = sorted(json.loads(line)["t"] for line in lines[:-1])  # every line is whole JSON
    assert steps == sorted(list(range(1, 301)) * 2)


def test_interpreter_exit_flushes_without_close(tmp_path):
    """Before tensorboardX's and multiprocessing's own exit handlers stop their writers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "lrscope.jsonl"
    process = _run_writer(path, 1000, tmp_path / "tb")
    assert process.wait(120) == 0
    assert [r["t"] for r in read_jsonl(path)] == list(range(1, 1001))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("lr-Adam/pg0/step_size")] == list(range(1, 1001))


def test_csv_long_format_accepts_new_tags(tmp_path):
    path = tmp_path / "lrscope.csv"
    sink = CsvSink(path)
    expected: dict[tuple[int, str], float] = {}
    for t, groups in ((1, ("pg0",)), (2, ("pg0",)), (3, ("pg0", "pg1"))):  # a group appears
        report, _ = make_report(t, groups=groups, distributions=t != 2)
        expected.update({(t, tag): value for tag, value in report.scalars().items()})
        sink.write(report)
    sink.close()
    # Reopening appends without a second header.
    again = CsvSink(path)
    again.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "wall_time", "tag", "value"]
    got = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-15, nan_ok=True)
    assert got[(3, "lr-Adam/pg1/step_size")] == pytest.approx(step_size_at(3, 1), rel=1e-15)
    assert (2, "lr-Adam/pg0/effective_lr/p50") not in got
    assert got[(3, "lr-Adam/pg0/effective_lr/p50")] > 0


def test_skipped_steps_only_go_to_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = SinkGroup([JsonlSink(tmp_path / "x.jsonl"), CsvSink(tmp_path / "x.csv"),
                       TensorBoardSink(tmp_path)])
    for t, skipped in ((1, False), (1, True), (2, False)):
        report = make_report(t)[0]
        report.skipped = skipped
        sinks.write(report)
    sinks.close()
    assert [(r["t"], r["skipped"]) for r in read_jsonl(tmp_path / "x.jsonl")] == [
        (1, False), (1, True), (2, False)]
    rows = list(csv.DictReader(open(tmp_path / "x.csv")))
    assert [int(r["step"]) for r in rows if r["tag"] == "lr-Adam/pg0/lr"] == [1, 2]
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in events.Scalars("lr-Adam/pg0/lr")] == [1, 2]


def test_console_table_is_plain_text_in_a_log_file():
    from rich.console import Console

    out = io.StringIO()
    sink = ConsoleSink(every=2, console=Console(file=out, width=120))
    raws = {}
    for t in range(1, 6):
        report, raws[t] = make_report(t)
        sink.write(report)
    sink.close()
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["step", "group", "lr", "step_size", "eta", "p05", "eta", "p50",
                                "eta", "p95", "eps_dom", "upd/param"]
    rows = [line.split() for line in lines[1:]]
    assert [(int(r[0]), r[1]) for r in rows] == [(t, g) for t in (1, 3, 5) for g in ("pg0", "pg1")]
    for row in rows:
        t, index = int(row[0]), int(row[1][2:])
        raw = raws[t][row[1]]
        assert float(row[2]) == pytest.approx(lr_at(t, index), rel=5e-3)
        assert float(row[3]) == pytest.approx(step_size_at(t, index), rel=5e-3)
        for column, q in ((4, 0.05), (5, 0.5), (6, 0.95)):
            assert _close(float(row[column]), np.quantile(raw.all_eta, q), 0.015)
        eps = sum(raw.eps_counts.values()) / raw.all_eta.size
        assert float(row[7].rstrip("%")) == pytest.approx(100 * eps, abs=0.006)
        assert float(row[8]) == pytest.approx(raw.update_to_param, rel=5e-3)


def test_file_sinks_write_off_the_training_thread_and_close_flushes(tmp_path):
    background, inline = Collect(background=True), Collect()
    sinks = SinkGroup([background, inline, JsonlSink(tmp_path / "x.jsonl")])
    for t in range(1, 201):
        sinks.write(make_report(t, distributions=False)[0])
    assert inline.steps == list(range(1, 201))
    sinks.close()
    assert background.steps == list(range(1, 201)) and background.closed and inline.closed
    assert inline.threads == {threading.current_thread().name}
    assert background.threads == {"lrscope-sink Collect"}  # a thread of its own
    assert len(list(read_jsonl(tmp_path / "x.jsonl"))) == 200


@pytest.mark.parametrize("background", [False, True])
def test_a_failing_sink_warns_once_and_the_others_continue(background):
    broken, healthy = Collect(background=background, fail_at=3), Collect(background=True)
    sinks = SinkGroup([broken, healthy])
    with pytest.warns(RuntimeWarning, match="Collect failed .*sink broke on purpose") as record:
        for t in range(1, 11):
            sinks.write(make_report(t, distributions=False)[0])
        sinks.close()
    assert len([w for w in record if "lrscope" in str(w.message)]) == 1
    assert broken.steps == [1, 2]
    assert healthy.steps == list(range(1, 11))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_disk_that_stays_full_costs_a_warning_and_a_count_of_lost_reports(monkeypatch):
    """A full disk is waited out (tests/test_sink_faults.py: it frees up); one that never
    does costs one warning when it fills and, at close, one with the reports lost."""
    import lrscope.sinks as sinks_module

    monkeypatch.setattr(sinks_module, "STALL_S", 0.3)
    survivor = Collect(background=True)
    sinks = SinkGroup([JsonlSink("/dev/full"), survivor])
    with pytest.warns(RuntimeWarning) as record:
        for t in range(1, 6):
            sinks.write(make_report(t)[0])
        started = time.monotonic()
        sinks.close()
    assert time.monotonic() - started < 2
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert "JsonlSink(/dev/full) cannot write for now" in messages[0] and "No space left" in messages[0]
    assert "5 reports sent to it are lost" in messages[1]
    assert survivor.steps == [1, 2, 3, 4, 5]


def test_an_unusable_log_dir_is_one_warning_not_an_error(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.warns(RuntimeWarning, match="cannot log to") as record:
        sinks = default_sinks(not_a_directory / "run")
    assert sinks == [] and len(record) == 1
    assert record[0].filename == __file__  # the caller's line, not lrscope's


def test_watch_logs_a_real_torch_run(tmp_path):
    torch = pytest.importorskip("torch")
    import lrscope
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    used_lr = []
    with lrscope.watch(optimizer, model=model, every=5, log_dir=tmp_path) as monitor:
        for _ in range(6):
            used_lr.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
    assert monitor.last.t == 6
    records = list(read_jsonl(tmp_path / "lrscope.jsonl"))
    assert [r["t"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record, lr in zip(records, used_lr):
        t, group = record["t"], record["groups"][0]
        assert group["lr"] == lr
        assert group["step_size"] == pytest.approx(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t),
                                                   rel=1e-12)
        assert group["weight_decay_rate"] == pytest.approx(lr * 0.1, rel=1e-12)
        assert (group["effective_lr"] is not None) == (t in (1, 6))
    # eta of the last step, from the optimizer's own state.
    eta = np.concatenate([
        (used_lr[-1] / ((state["exp_avg_sq"] / (1 - 0.999**6)).sqrt() + 1e-8)).numpy().ravel()
        for state in optimizer.state.values()])
    last = records[-1]["groups"][0]["effective_lr"]
    assert _close(last["p50"], np.quantile(eta, 0.5)) and _close(last["p95"], np.quantile(eta, 0.95))
    assert last["count"] == eta.size
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    series = events.Scalars("lr-AdamW/pg0/step_size")
    assert [e.step for e in series] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([e.value for e in series], [r["groups"][0]["step_size"] for r in records],
                       rtol=1e-6)
    assert [e.step for e in events.Scalars("lr-AdamW/pg0/effective_lr/p50")] == [1, 6]


def test_log_dir_and_sinks_together_write_to_both(tmp_path):
    """log_dir= was silently dropped when sinks= was given too."""
    torch = pytest.importorskip("torch")
    import lrscope

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    collect = Collect()
    with lrscope.watch(optimizer, log_dir=tmp_path, sinks=[collect]):
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
    assert collect.steps == [1, 2] and collect.closed
    assert [r["t"] for r in read_jsonl(tmp_path / "lrscope.jsonl")] == [1, 2]
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("options,error,message", [
    ({"every": 2.5}, ValueError, "every must be a positive whole number of steps, got 2.5"),
    ({"every": "10"}, ValueError, "every must be a positive whole number of steps, got '10'"),
    ({"every": 0}, ValueError, "every must be a positive whole number of steps, got 0"),
    ({"sinks": "console"}, TypeError, "sinks= takes a list of sinks"),
    ({"sinks": ["runs/x"]}, TypeError, "got 'runs/x' (for a directory, pass log_dir=)"),
])
def test_bad_watch_options_are_clear_errors(options, error, message):
    torch = pytest.importorskip("torch")
    import lrscope

    optimizer = torch.optim.Adam(torch.nn.Linear(3, 1).parameters())
    with pytest.raises(error, match=re.escape(message)):
        lrscope.watch(optimizer, **options)


def test_watch_with_an_unusable_log_dir_still_trains(tmp_path):
    torch = pytest.importorskip("torch")
    import lrscope

    blocker = tmp_path / "file"
    blocker.write_text("")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = lrscope.watch(optimizer, log_dir=blocker / "run")
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
        monitor.close()
    assert monitor.last.t == 3
    assert [str(w.message) for w in record if "lrscope" in str(w.message)] == [
        str(w.message) for w in record if "cannot log to" in str(w.message)]
    assert len([w for w in record if "cannot log to" in str(w.message)]) == 1


def test_tensorboard_sink_needs_a_directory_or_a_writer(tmp_path):
    with pytest.raises(ValueError, match="either log_dir or writer"):
        TensorBoardSink()
    with pytest.raises(ValueError, match="histogram_every"):
        TensorBoardSink(tmp_path, histogram_every=0)


def test_a_stuck_sink_makes_reports_drop_instead_of_blocking_training(monkeypatch):
    import lrscope.sinks as sinks_module

    monkeypatch.setattr(sinks_module, "QUEUE_SIZE", 4)
    monkeypatch.setattr(sinks_module, "STALL_S", 0.2)
    release = threading.Event()

    class Stuck(Collect):
        def write(self, report):
            release.wait(60)
            super().write(report)

    stuck = Stuck(background=True)
    sinks = SinkGroup([stuck])
    with pytest.warns(RuntimeWarning, match="Stuck is 4 reports behind .* dropped until it catches up") as record:
        for t in range(1, 21):
            sinks.write(make_report(t, distributions=False)[0])
    assert len(record) == 1
    release.set()
    with pytest.warns(RuntimeWarning, match=r"Stuck lost (\d+) reports, dropped") as record:
        sinks.close()
    assert stuck.steps[:4] == [1, 2, 3, 4]  # the first reports are kept, later ones dropped
    assert len(stuck.steps) < 20 and stuck.steps == sorted(stuck.steps)
    lost = int(re.search(r"lost (\d+) reports", str(record[0].message)).group(1))
    assert lost == 20 - len(stuck.steps)
