"""``lrscope check LOGDIR``: exit codes 0 / 1 / 2 through the real command, text and JSON,
JSONL and TensorBoard input, and docs/findings.md in step with the rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrscope.findings import RULES
from lrscope.report import GroupReport, StepReport
from lrscope.sinks import JsonlSink

DOCS = Path(__file__).resolve().parent.parent / "docs" / "findings.md"


def lrscope(*args: str) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lrscope.cli", *args], capture_output=True,
                          text=True, timeout=300)


def reports(lrs):
    for t, lr in enumerate(lrs, start=1):
        group = GroupReport(name="pg0", lr=lr, step_size=lr, weight_decay_rate=0.0)
        yield StepReport(t=t, optimizer="SGD", framework="torch", family="sgd", groups=[group])


def write_jsonl(path: Path, lrs) -> Path:
    sink = JsonlSink(path / "lrscope.jsonl")
    for report in reports(lrs):
        sink.write(report)
    sink.close()
    return path


def test_a_warning_exits_1_and_names_rule_subject_steps_and_explanation(tmp_path):
    done = lrscope("check", str(write_jsonl(tmp_path, [0.1, 0.0, 0.0, 0.1])))
    assert done.returncode == 1, done.stderr
    assert "WARNING lr_zero" in done.stdout
    assert "lr-SGD/pg0 (steps 2-3): lr was 0" in done.stdout
    assert RULES["lr_zero"].explanation in " ".join(done.stdout.split())  # wrapped
    assert "1 warning, 0 info" in done.stdout


def test_json_output(tmp_path):
    done = lrscope("check", str(write_jsonl(tmp_path, [0.1, 0.0])), "--json")
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["warnings"] == 1 and out["steps"] == [1, 2] and out["optimizers"] == ["lr-SGD"]
    [finding] = out["findings"]
    assert finding == {"id": "lr_zero", "severity": "warning", "subject": "lr-SGD/pg0",
                       "steps": [[2, 2]], "message": "lr was 0",
                       "explanation": RULES["lr_zero"].explanation}


def test_no_warning_exits_0_and_ignore_leaves_a_rule_out(tmp_path):
    assert lrscope("check", str(write_jsonl(tmp_path / "a", [0.1, 0.1]))).returncode == 0
    done = lrscope("check", str(write_jsonl(tmp_path / "b", [0.1, 0.0])), "--ignore", "lr_zero")
    assert done.returncode == 0 and "nothing wrong found" in done.stdout


@pytest.mark.parametrize("setup", ["missing", "empty_dir", "garbage", "fifo", "unknown_rule", "no_logdir"])
def test_bad_input_exits_2_with_one_line(setup, tmp_path):
    target = tmp_path / "run"
    args = []
    if setup == "empty_dir":
        target.mkdir()
    elif setup == "garbage":
        target.mkdir()
        (target / "lrscope.jsonl").write_bytes(b"\x00\xff not json\n{\"t\": \"x\"}\n")
    elif setup == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        target.mkdir()
        os.mkfifo(target / "lrscope.jsonl")
    elif setup == "unknown_rule":
        write_jsonl(target.parent, [0.1])
        target, args = target.parent, ["--ignore", "no_such_rule"]
    done = lrscope("check", *([] if setup == "no_logdir" else [str(target)]), *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("lrscope check: error:")


def test_tensorboard_logs_are_read(tmp_path):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    from lrscope.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    for report in reports([0.1, 0.0, 0.1]):
        sink.write(report)
    sink.close()
    done = lrscope("check", str(tmp_path), "--json")
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["source"].endswith("(TensorBoard)")
    assert [(f["id"], f["steps"]) for f in out["findings"]] == [("lr_zero", [[2, 2]])]


def test_rules_lists_every_rule():
    done = lrscope("check", "--rules")
    assert done.returncode == 0
    for rule_id in RULES:
        assert f"\n{rule_id} (" in f"\n{done.stdout}"


def test_the_demo_is_healthy(tmp_path):
    """A healthy run: `lrscope demo`, then `lrscope check` on its JSONL and on its
    TensorBoard event files alone."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("tensorboardX")
    pytest.importorskip("matplotlib")
    from lrscope.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--steps", "300", "--every", "25", "--out", str(out)]) == 0
    done = lrscope("check", str(out))
    assert done.returncode == 0, done.stdout
    assert "0 warnings" in done.stdout
    events = tmp_path / "events"
    events.mkdir()
    for path in out.glob("events.out.tfevents.*"):
        shutil.copy(path, events)
    done = lrscope("check", str(events))
    assert done.returncode == 0, done.stdout
    assert "(TensorBoard)" in done.stdout


def test_the_docs_list_every_rule():
    text = " ".join(DOCS.read_text(encoding="utf-8").split())  # wrapped lines joined
    for rule in RULES.values():
        assert f"`{rule.id}`" in text
        for part in (rule.severity, rule.threshold, rule.reason, rule.explanation):
            assert " ".join(part.split()) in text, (rule.id, part[:60])
