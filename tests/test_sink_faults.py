"""Faults the sinks must survive without losing a line: a full disk, a hung or dead writer,
a killed process, a log directory deleted mid-run, concurrent writers, bad start-up input.

Faults are real where this machine allows: a small tmpfs (root only, else skipped) fills
and frees a disk, subprocesses are killed with real signals, a FIFO is a real FIFO.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

import lrscope.sinks as sinks_module
from lrscope.logs import read_jsonl
from lrscope.sinks import SinkGroup
from lrscope.sinks.csv import CsvSink
from lrscope.sinks.defaults import default_sinks
from lrscope.sinks.jsonl import JsonlSink
from lrscope.sinks.tensorboard import TensorBoardSink
from tests._sink_reports import Collect, make_report

SRC = str(Path(__file__).resolve().parents[1] / "src")
TAG = "lr-Adam/pg0/lr"


class Disk:
    """A small tmpfs mounted at ``path``: ``fill()`` takes all its space, ``free()`` gives it back."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"x" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


def _mount(path: Path, options: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root: a container or CI runner; skipped elsewhere)."""
    path = tmp_path / "disk"
    path.mkdir()
    if not _mount(path, "size=2m"):
        pytest.skip("mounting a small tmpfs needs root")
    yield Disk(path)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (tmpfs mounted ro as root), or a directory without write
    permission for a user other than root."""
    path = tmp_path / "ro"
    path.mkdir()
    if _mount(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
    else:
        pytest.skip("no read-only place: root without mount")


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that escaped any thread (they print a traceback on stderr)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def _lrscope_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("lrscope")]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _csv_steps(path: Path) -> list[int]:
    """The steps of the CSV log, one per report (from the rows of one tag)."""
    return [int(row["step"]) for row in _csv_rows(path) if row["tag"] == TAG]


def _jsonl_steps(path: Path) -> list[int]:
    """The steps of the JSONL log, after checking that every complete line is whole JSON."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file ends in a torn line"
    return [json.loads(line)["t"] for line in lines[:-1]]


def _written_jsonl_steps(path: Path) -> list[int]:
    """The steps of the JSONL log's complete lines, while a sink may be writing the next
    one (a reader may see a line in the middle of its write; the file is whole once the
    sink is closed, which ``_jsonl_steps`` checks)."""
    written = path.read_bytes().rpartition(b"\n")[0]
    return [json.loads(line)["t"] for line in written.split(b"\n") if line]


def _tensorboard_steps(log_dir: Path, tag: str = TAG) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def _write(sinks: SinkGroup, steps) -> None:
    for t in steps:
        sinks.write(make_report(t, distributions=t % 3 == 1)[0])


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- 5. a full disk -------------------------------------------------------------------------

def test_a_disk_full_for_a_few_seconds_loses_no_line(small_disk, thread_errors):
    """Every report written while the disk was full reaches JSONL, CSV and TensorBoard once
    space returns; no torn line, no traceback, no sink disabled, close() is quick."""
    log_dir = small_disk.path / "run"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sinks = SinkGroup([*default_sinks(log_dir), CsvSink(log_dir / "lrscope.csv")])
        _write(sinks, range(1, 6))
        sinks.flush()
        small_disk.fill()
        _write(sinks, range(6, 16))
        time.sleep(1.5)  # the sinks meet the full disk
        small_disk.free()
        _write(sinks, range(16, 21))
        started = time.monotonic()
        sinks.close()
        closing = time.monotonic() - started
    assert _jsonl_steps(log_dir / "lrscope.jsonl") == list(range(1, 21))
    assert _csv_steps(log_dir / "lrscope.csv") == list(range(1, 21))
    assert (log_dir / "lrscope.csv").read_text().count("step,wall_time") == 1
    assert _tensorboard_steps(log_dir) == list(range(1, 21))
    assert thread_errors == []
    messages = _lrscope_warnings(record)
    assert messages and all("No space left" in m for m in messages), messages
    assert not any("disabled" in m for m in messages)
    assert closing < 3


def test_a_dead_tensorboardx_writer_does_not_stop_the_other_sinks(small_disk, tmp_path, monkeypatch):
    """A full disk kills the thread of a user's tensorboardX writer, whose queue then blocks:
    the TensorBoard sink hangs, the JSONL and CSV sinks write every report, and close()
    gives up on the hung sink with a warning instead of waiting 30 s."""
    from tensorboardX import SummaryWriter

    monkeypatch.setattr(sinks_module, "STALL_S", 0.5)
    monkeypatch.setattr(sinks_module, "CLOSE_TIMEOUT_S", 3.0)
    writer = SummaryWriter(logdir=str(small_disk.path / "tb"), flush_secs=1)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # tensorboardX's thread dies
    sinks = SinkGroup([TensorBoardSink(writer=writer), JsonlSink(tmp_path / "x.jsonl"),
                       CsvSink(tmp_path / "x.csv")])
    _write(sinks, range(1, 4))
    sinks.flush()
    small_disk.fill()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(4, 200):
            _write(sinks, [t])
            time.sleep(0.01)
        assert _wait_for(lambda: _written_jsonl_steps(tmp_path / "x.jsonl")[-1:] == [199], timeout=5)
        small_disk.free()
        started = time.monotonic()
        sinks.close()
        closing = time.monotonic() - started
    # The writer's thread died: tensorboardX's own atexit close() would block for ever on its
    # full queue and hang the interpreter's exit (tensorboardX's doing, not lrscope's).
    writer.file_writer.event_writer._event_queue.cancel_join_thread()
    writer.file_writer.event_writer._closed = True
    assert _jsonl_steps(tmp_path / "x.jsonl") == list(range(1, 200))
    assert _csv_steps(tmp_path / "x.csv") == list(range(1, 200))
    assert closing < 2.5
    messages = _lrscope_warnings(record)
    assert any("TensorBoardSink" in m and "lost" in m for m in messages), messages


# -- 6. a hung sink -------------------------------------------------------------------------

class Hung(Collect):
    """A tracker whose server stopped answering: ``write`` blocks until released."""

    def __init__(self) -> None:
        super().__init__(background=True)
        self.release = threading.Event()

    def write(self, report) -> None:
        self.release.wait(60)
        super().write(report)


def test_a_hung_sink_does_not_hold_back_the_file_sinks(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks_module, "STALL_S", 0.5)
    hung = Hung()
    sinks = SinkGroup([hung, JsonlSink(tmp_path / "x.jsonl"), CsvSink(tmp_path / "x.csv")])
    try:
        _write(sinks, range(1, 31))
        assert _wait_for(lambda: len(_written_jsonl_steps(tmp_path / "x.jsonl")) == 30, timeout=5)
        assert _wait_for(lambda: len(_csv_steps(tmp_path / "x.csv")) == 30, timeout=5)
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match=r"Hung .*30 reports") as record:
            sinks.close()
        assert time.monotonic() - started < 2
        assert len(_lrscope_warnings(record)) == 1
    finally:
        hung.release.set()
    assert _jsonl_steps(tmp_path / "x.jsonl") == list(range(1, 31))


def test_a_sink_that_raises_is_disabled_and_the_others_keep_writing(tmp_path):
    broken = Collect(background=True, fail_at=2)
    sinks = SinkGroup([broken, JsonlSink(tmp_path / "x.jsonl")])
    with pytest.warns(RuntimeWarning, match="Collect failed .*it is disabled") as record:
        _write(sinks, range(1, 11))
        sinks.close()
    assert len(_lrscope_warnings(record)) == 1
    assert broken.steps == [1] and broken.closed
    assert _jsonl_steps(tmp_path / "x.jsonl") == list(range(1, 11))


# -- 7. torn lines --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_the_next_run_cuts_a_torn_last_line_before_appending(tmp_path, kind):
    """A process killed inside a write leaves the start of a line; the next run appending to
    the same file must not glue its first record onto it."""
    path = tmp_path / f"lrscope.{kind}"
    make = JsonlSink if kind == "jsonl" else CsvSink
    first = SinkGroup([make(path)])
    _write(first, range(1, 4))
    first.close()
    line = path.read_bytes().splitlines()[1]
    with open(path, "ab") as handle:  # what SIGKILL leaves in the middle of a write
        handle.write(line[:len(line) // 2])
    second = SinkGroup([make(path)])
    _write(second, range(4, 7))
    second.close()
    if kind == "jsonl":
        assert _jsonl_steps(path) == list(range(1, 7))
    else:
        rows = list(csv.reader(open(path, newline="")))
        assert rows[0] == ["step", "wall_time", "tag", "value"]
        assert {len(row) for row in rows} == {4}
        assert _csv_steps(path) == list(range(1, 7))


def test_a_torn_tail_too_long_for_a_log_line_is_ended_not_cut(tmp_path, monkeypatch):
    """More than MAX_CUT bytes without a newline: perhaps not a log at all; nothing of it
    is deleted, a newline ends it (readers skip it)."""
    import lrscope.sinks._files as files

    monkeypatch.setattr(files, "MAX_CUT", 100)
    path = tmp_path / "lrscope.jsonl"
    path.write_bytes(b"x" * 101)
    sinks = SinkGroup([JsonlSink(path)])
    _write(sinks, [1])
    sinks.close()
    assert path.read_bytes().startswith(b"x" * 101 + b"\n{")
    assert [r["t"] for r in read_jsonl(path)] == [1]


_FULL_DISK_WRITER = textwrap.dedent("""
    import sys, time
    from lrscope.sinks import SinkGroup
    from lrscope.sinks.jsonl import JsonlSink
    from tests._sink_reports import make_report

    sinks = SinkGroup([JsonlSink(sys.argv[1])])
    t = 0
    while True:
        t += 1
        sinks.write(make_report(t)[0])
        print(t, flush=True)
        time.sleep(0.002)
""")


def test_a_line_torn_by_a_full_disk_is_not_glued_to_the_next_runs_first(small_disk):
    """A write cut short by a full disk, then the process killed (SIGKILL): the next run,
    once space returns, appends whole records after whole records."""
    path = small_disk.path / "lrscope.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(Path(SRC).parent)])}
    with open(small_disk.path.parent / "out.txt", "w") as out:
        writer = subprocess.Popen([sys.executable, "-c", _FULL_DISK_WRITER, str(path)], env=env,
                                  stdout=out, stderr=subprocess.DEVNULL)
        try:
            assert _wait_for(lambda: path.exists() and path.stat().st_size > 100_000, timeout=60)
            small_disk.fill()
            time.sleep(1.0)  # the writer meets the full disk, a write is cut short
        finally:
            writer.kill()
            writer.wait(30)
    small_disk.free()
    sinks = SinkGroup([JsonlSink(path)])
    _write(sinks, range(1001, 1004))
    sinks.close()
    steps = _jsonl_steps(path)
    assert steps[-3:] == [1001, 1002, 1003]
    assert steps[:-3] == list(range(1, len(steps) - 2))


# -- 8. SIGTERM, a recreated log directory, concurrent CSV writers --------------------------

_TRAINING = textwrap.dedent("""
    import os, signal, sys
    import torch
    import lrscope

    log_dir, progress, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "own-handler":
        def handler(signum, frame):
            with open(os.path.join(log_dir, "handled"), "w") as f:
                f.write("yes")
            sys.exit(3)
        signal.signal(signal.SIGTERM, handler)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = lrscope.watch(optimizer, log_dir=log_dir, every=10)
    done = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    x = torch.randn(4, 8)
    while True:
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        os.write(done, b"%d\\n" % monitor.last.t)
""")


def _train_until_signalled(tmp_path: Path, sig: int, mode: str = "plain") -> tuple[int, int]:
    """Train in a subprocess, send ``sig`` after 300 steps; (exit code, steps taken)."""
    pytest.importorskip("torch")
    log_dir, progress = tmp_path / "run", tmp_path / "progress"
    log_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-c", _TRAINING, str(log_dir), str(progress), mode],
                               env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.PIPE)
    try:
        taken = lambda: progress.read_bytes().count(b"\n") if progress.exists() else 0  # noqa: E731
        assert _wait_for(lambda: taken() >= 300 or process.poll() is not None, timeout=120)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        os.kill(process.pid, sig)
        code = process.wait(30)
    finally:
        process.kill()
        process.wait(30)
    assert b"Traceback" not in process.stderr.read()
    return code, int(progress.read_bytes().split(b"\n")[-2])


def test_sigterm_writes_every_step_taken(tmp_path):
    code, taken = _train_until_signalled(tmp_path, signal.SIGTERM)
    assert code == -signal.SIGTERM  # the process still dies of the signal
    steps = _jsonl_steps(tmp_path / "run" / "lrscope.jsonl")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) in (taken, taken + 1)
    assert _tensorboard_steps(tmp_path / "run", "lr-Adam/pg0/lr") == steps


def test_sigterm_runs_the_handler_installed_before_watch(tmp_path):
    code, taken = _train_until_signalled(tmp_path, signal.SIGTERM, mode="own-handler")
    assert code == 3 and (tmp_path / "run" / "handled").read_text() == "yes"
    steps = _jsonl_steps(tmp_path / "run" / "lrscope.jsonl")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) in (taken, taken + 1)


def test_sigkill_leaves_whole_lines_that_the_next_run_appends_to(tmp_path):
    code, _ = _train_until_signalled(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    steps = [r["t"] for r in read_jsonl(tmp_path / "run" / "lrscope.jsonl")]
    assert steps == list(range(1, len(steps) + 1))
    sinks = SinkGroup(default_sinks(tmp_path / "run"))
    _write(sinks, [1000])
    sinks.close()
    assert _jsonl_steps(tmp_path / "run" / "lrscope.jsonl") == [*steps, 1000]


def test_a_log_dir_deleted_and_recreated_mid_run_is_written_again(tmp_path):
    """Every sink, TensorBoard included, notices and writes on into new files (one warning
    each); nothing written after the directory came back is lost."""
    log_dir = tmp_path / "run"
    sinks = SinkGroup([*default_sinks(log_dir), CsvSink(log_dir / "lrscope.csv")])
    _write(sinks, range(1, 4))
    sinks.flush()
    shutil.rmtree(log_dir)
    log_dir.mkdir()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _write(sinks, range(4, 7))
        sinks.close()
    assert _jsonl_steps(log_dir / "lrscope.jsonl") == [4, 5, 6]
    assert _csv_steps(log_dir / "lrscope.csv") == [4, 5, 6]
    assert _tensorboard_steps(log_dir) == [4, 5, 6]
    messages = _lrscope_warnings(record)
    assert len(messages) == 3 and all("deleted" in m for m in messages), messages
    for name in ("lrscope.jsonl", "lrscope.csv", "events.out.tfevents"):
        assert sum(name in m for m in messages) == 1, messages


def test_reports_wait_while_the_log_dir_is_gone_and_are_written_when_it_returns(tmp_path):
    log_dir = tmp_path / "run"
    sinks = SinkGroup([*default_sinks(log_dir), CsvSink(log_dir / "lrscope.csv")])
    _write(sinks, range(1, 4))
    sinks.flush()
    shutil.rmtree(log_dir)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _write(sinks, range(4, 7))
        time.sleep(0.3)  # the sinks find the directory gone
        log_dir.mkdir()
        _write(sinks, range(7, 9))
        sinks.close()
    assert _jsonl_steps(log_dir / "lrscope.jsonl") == list(range(4, 9))
    assert _csv_steps(log_dir / "lrscope.csv") == list(range(4, 9))
    assert _tensorboard_steps(log_dir) == list(range(4, 9))


def test_a_log_dir_deleted_for_good_costs_a_warning_per_sink_with_what_was_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks_module, "STALL_S", 0.3)
    log_dir = tmp_path / "run"
    survivor = Collect()
    sinks = SinkGroup([*default_sinks(log_dir), CsvSink(tmp_path / "elsewhere.csv"), survivor])
    _write(sinks, range(1, 4))
    sinks.flush()
    shutil.rmtree(log_dir)
    with pytest.warns(RuntimeWarning) as record:
        _write(sinks, range(4, 8))
        started = time.monotonic()
        sinks.close()
    assert time.monotonic() - started < 2
    messages = _lrscope_warnings(record)
    lost = [m for m in messages if "4 reports" in m and "lost" in m]
    assert len(lost) == 2 and any("TensorBoardSink" in m for m in lost), messages
    assert any("JsonlSink" in m for m in lost), messages
    assert not log_dir.exists()  # a deleted directory is not brought back
    assert survivor.steps == list(range(1, 8))
    assert _csv_steps(tmp_path / "elsewhere.csv") == list(range(1, 8))


def _create_csv_logs(paths: list[str], barrier) -> None:
    for path in paths:
        barrier.wait(10)
        sinks = SinkGroup([CsvSink(path)])
        _write(sinks, [1])
        sinks.close()


def test_processes_creating_one_csv_file_write_its_header_once(tmp_path):
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    paths = [str(tmp_path / f"trial{i}.csv") for i in range(30)]
    barrier = context.Barrier(8)
    workers = [context.Process(target=_create_csv_logs, args=(paths, barrier)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * 8
    for path in paths:
        lines = Path(path).read_text().splitlines()
        assert lines[0] == "step,wall_time,tag,value"
        assert lines.count(lines[0]) == 1, path
        assert _csv_steps(Path(path)) == [1] * 8


# -- 10. start-up ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda d: CsvSink(d / "lrscope.csv"), lambda d: JsonlSink(d / "lrscope.jsonl"),
    lambda d: TensorBoardSink(d / "tb"),
], ids=["csv", "jsonl", "tensorboard"])
def test_a_file_sink_on_a_read_only_disk_warns_instead_of_raising(read_only_dir, make):
    with pytest.warns(RuntimeWarning, match="cannot write .*training continues") as record:
        sink = make(read_only_dir)
    assert len(_lrscope_warnings(record)) == 1
    assert record[0].filename == __file__  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinks = SinkGroup([sink])
        _write(sinks, [1, 2])
        sinks.close()


def test_a_csv_sink_started_on_a_full_disk_writes_once_space_returns(small_disk):
    small_disk.fill()
    path = small_disk.path / "lrscope.csv"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sinks = SinkGroup([CsvSink(path)])  # no exception before training
        _write(sinks, [1, 2])
        time.sleep(0.3)
        small_disk.free()
        _write(sinks, [3])
        sinks.close()
    assert path.read_text().count("step,wall_time") == 1
    assert _csv_steps(path) == [1, 2, 3]


def _watch_in_thread(optimizer, **options):
    import lrscope

    result: dict = {}

    def attach():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            result["monitor"] = lrscope.watch(optimizer, **options)
        result["warnings"] = _lrscope_warnings(record)

    thread = threading.Thread(target=attach, daemon=True)
    thread.start()
    thread.join(10)
    return thread, result


def test_watch_does_not_block_on_a_fifo_in_the_log_dir(tmp_path):
    torch = pytest.importorskip("torch")
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    os.mkfifo(log_dir / "lrscope.jsonl")
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    thread, result = _watch_in_thread(optimizer, log_dir=log_dir)
    if thread.is_alive():  # release the blocked open() so the thread can end
        os.close(os.open(log_dir / "lrscope.jsonl", os.O_RDONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("lrscope.watch blocked on a FIFO")
    monitor = result["monitor"]
    assert len(result["warnings"]) == 1 and "FIFO" in result["warnings"][0], result["warnings"]
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
    monitor.close()
    assert _tensorboard_steps(log_dir, "lr-SGD/pg0/lr") == [1, 2]


def _lrscope_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lrscope")}


@pytest.mark.parametrize("options,message", [
    ({"grad_scaler": 5}, "grad_scaler= takes the torch.amp.GradScaler"),
    ({"model": 5}, "model= takes the torch.nn.Module"),
])
def test_bad_torch_watch_arguments_raise_and_leave_nothing_behind(tmp_path, options, message):
    torch = pytest.importorskip("torch")
    import lrscope

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    threads = _lrscope_threads()
    with pytest.raises(TypeError, match=message):
        lrscope.watch(optimizer, log_dir=tmp_path / "run", **options)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert _lrscope_threads() <= threads
    optimizer.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert not (tmp_path / "run").exists()
