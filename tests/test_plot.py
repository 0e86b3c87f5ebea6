"""``lrscope plot``: reads JSONL or TensorBoard logs, draws a PNG, refuses non-lrscope dirs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lrscope import logs, plot
from lrscope.cli import main
from lrscope.sinks.jsonl import JsonlSink
from tests._sink_reports import lr_at, make_report, step_size_at, write_reports

pytest.importorskip("matplotlib")
STEPS = 9


def _log(log_dir, sinks) -> dict:
    return write_reports(sinks, STEPS, every=4)


def _check_png(path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _check_run(run: plot.Run, raws: dict) -> None:
    assert sorted(run.groups) == ["lr-Adam/pg0", "lr-Adam/pg1"]
    for index, group in enumerate(("pg0", "pg1")):
        metrics = run.groups[f"lr-Adam/{group}"]
        assert metrics["step_size"].steps.tolist() == list(range(1, STEPS + 1))
        assert np.allclose(metrics["step_size"].values,
                           [step_size_at(t, index) for t in range(1, STEPS + 1)], rtol=1e-6)
        assert np.allclose(metrics["lr"].values, [lr_at(t, index) for t in range(1, STEPS + 1)],
                           rtol=1e-6)
        p50 = metrics["effective_lr/p50"]
        assert p50.steps.tolist() == [1, 5, 9]
        assert np.allclose(p50.values, [np.quantile(raws[t][group].all_eta, 0.5) for t in (1, 5, 9)],
                           rtol=0.01)
        assert np.allclose(metrics["update_to_param"].values,
                           [raws[t][group].update_to_param for t in (1, 5, 9)], rtol=1e-6)
    tensor = run.params["lr-Adam/pg1"]["layer0.weight"]["effective_lr/p95"]
    assert np.allclose(tensor.values, [np.quantile(raws[t]["pg1"].eta["layer0.weight"], 0.95)
                                       for t in (1, 5, 9)], rtol=0.01)


def test_plot_from_jsonl(tmp_path, capsys):
    raws = _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    _check_run(plot.load(tmp_path), raws)
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "out.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out.png'}"
    _check_png(tmp_path / "out.png")
    assert main(["plot", str(tmp_path / "lrscope.jsonl")]) == 0  # a file; default PNG beside it
    _check_png(tmp_path / "lrscope.png")


def test_plot_from_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    from lrscope.sinks.tensorboard import TensorBoardSink

    raws = _log(tmp_path, [TensorBoardSink(tmp_path, params=True)])
    run = plot.load(tmp_path)
    assert "TensorBoard" in run.source
    _check_run(run, raws)
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "tb.png")]) == 0
    _check_png(tmp_path / "tb.png")


def test_a_torn_last_line_is_ignored(tmp_path):
    raws = _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    with open(tmp_path / "lrscope.jsonl", "a") as handle:
        handle.write('{"wall_time": 1.0, "t": 10, "groups": [{"na')
    _check_run(plot.load(tmp_path), raws)


@pytest.mark.parametrize("content", [None, "notes.jsonl", "tensorboard"])
def test_no_lrscope_data_is_a_one_line_error(tmp_path, capsys, content):
    if content == "notes.jsonl":
        (tmp_path / content).write_text('{"hello": 1}\n')
    elif content is not None:
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(tmp_path)) as writer:
            writer.add_scalar("loss", 1.0, 1)
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no lrscope data" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


def test_logs_without_distributions_or_measured_empirically(tmp_path):
    sink = JsonlSink(tmp_path / "lrscope.jsonl")
    for t in range(1, 4):
        report, _ = make_report(t, groups=("pg0",), optimizer="Muon", distributions=False)
        report.empirical = t > 1  # empirical mode: |update| instead of eta
        if report.empirical:
            report.groups[0].update_magnitude = make_report(t)[0].groups[0].effective_lr
        sink.write(report)
    sink.close()
    run = plot.load(tmp_path)
    assert run.groups["lr-Muon/pg0"]["update_magnitude/p50"].steps.tolist() == [2, 3]
    assert "effective_lr/p50" not in run.groups["lr-Muon/pg0"]
    assert main(["plot", str(tmp_path)]) == 0
    _check_png(tmp_path / "lrscope.png")


def test_a_run_again_in_the_same_log_dir_replaces_the_earlier_steps(tmp_path, capsys):
    """Running a script again with the same log_dir, then resuming from a checkpoint of its
    step 3: both loaders keep, for each t, the record written last (TensorBoard's rule for a
    step counter that goes back), and lrscope plot says so."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorboardX")
    import lrscope

    def train(lr, steps, checkpoint=None):
        """``steps`` watched steps; returns a checkpoint taken after the third, if any."""
        saved = None
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        if checkpoint is not None:
            model.load_state_dict(checkpoint[0])
            optimizer.load_state_dict(checkpoint[1])
            optimizer.param_groups[0]["lr"] = lr
        with lrscope.watch(optimizer, model=model, log_dir=tmp_path):
            for step in range(steps):
                optimizer.zero_grad()
                model(torch.randn(8, 4)).square().mean().backward()
                optimizer.step()
                if step == 2:
                    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        return saved

    train(1e-3, 5)
    checkpoint = train(1e-2, 5)  # run again
    train(5e-3, 2, checkpoint)  # then resumed from its step 3, with another lr
    expected = [1e-2, 1e-2, 1e-2, 5e-3, 5e-3]
    events = tmp_path / "events"
    events.mkdir()
    for path in tmp_path.glob("*tfevents*"):
        path.rename(events / path.name)
    for source in (tmp_path, events):
        run = plot.load(source)
        lr = run.groups["lr-Adam/pg0"]["lr"]
        assert lr.steps.tolist() == [1, 2, 3, 4, 5] and np.allclose(lr.values, expected), source
        assert run.notes == [plot.restart_notes([("lr-Adam", 5, 1), ("lr-Adam", 5, 4)])[0]]
    assert main(["plot", str(tmp_path)]) == 0
    assert "note: lr-Adam: t went back 2 times, first from 5 to 1" in capsys.readouterr().err


# --- Malformed logs: bad lines are skipped and counted in one note, the rest is drawn ---------

_BAD = "__BAD__"


def _jsonl_lines(tmp_path, steps: int = STEPS) -> list[bytes]:
    write_reports([JsonlSink(tmp_path / "lrscope.jsonl")], steps, every=4)
    return (tmp_path / "lrscope.jsonl").read_bytes().splitlines(keepends=True)


def _replace(line: bytes, path: tuple, raw: str | None) -> bytes:
    """``line`` with the value at ``path`` (keys and indices) replaced by the raw JSON text
    ``raw``, or deleted where ``raw`` is None."""
    record = json.loads(line)
    *parents, last = path
    target = record
    for key in parents:
        target = target[key]
    if raw is None:
        del target[last]
        return (json.dumps(record) + "\n").encode()
    target[last] = _BAD
    return (json.dumps(record).replace(json.dumps(_BAD), raw) + "\n").encode()


_DEEP = "[" * 100_000 + "]" * 100_000
_MALFORMED = {
    "nested JSON bomb": lambda line: _replace(line, ("groups", 0, "extra"), _DEEP),
    "t 1e400": lambda line: _replace(line, ("t",), "1e400"),
    "t null": lambda line: _replace(line, ("t",), "null"),
    "t a string": lambda line: _replace(line, ("t",), '"5"'),
    "t negative": lambda line: _replace(line, ("t",), "-5"),
    "t not whole": lambda line: _replace(line, ("t",), "5.5"),
    "t true": lambda line: _replace(line, ("t",), "true"),
    "t too large": lambda line: _replace(line, ("t",), str(10**30)),
    "no t": lambda line: _replace(line, ("t",), None),
    "no groups": lambda line: _replace(line, ("groups",), None),
    "no optimizer": lambda line: _replace(line, ("optimizer",), None),
    "a group without name": lambda line: _replace(line, ("groups", 0, "name"), None),
    "groups an object": lambda line: _replace(line, ("groups",), "{}"),
    "a group a string": lambda line: _replace(line, ("groups", 1), '"pg1"'),
    "params a list": lambda line: _replace(line, ("groups", 0, "params"), "[1, 2]"),
    "a tensor a number": lambda line: _replace(line, ("groups", 0, "params", "layer1.bias"), "3"),
    "extra a list": lambda line: _replace(line, ("groups", 0, "extra"), "[]"),
    "an extra value a string": lambda line: _replace(line, ("groups", 0, "extra"), '{"a": "b"}'),
    "lr a string": lambda line: _replace(line, ("groups", 0, "lr"), '"1e-3"'),
    "lr true": lambda line: _replace(line, ("groups", 0, "lr"), "true"),
    "lr NaN": lambda line: _replace(line, ("groups", 0, "lr"), "NaN"),
    "lr 1e400": lambda line: _replace(line, ("groups", 0, "lr"), "1e400"),
    "effective_lr a list": lambda line: _replace(line, ("groups", 0, "effective_lr"), "[]"),
    "a quantile a string": lambda line: _replace(line, ("groups", 0, "effective_lr", "p50"), '"x"'),
    "a tensor's ratio an object": lambda line: _replace(
        line, ("groups", 1, "params", "layer0.weight", "update_to_param"), "{}"),
    "optimizer a number": lambda line: _replace(line, ("optimizer",), "7"),
    "a list": lambda line: b"[1, 2, 3]\n",
    "a number": lambda line: b"17\n",
    "an empty object": lambda line: b"{}\n",
    "one non-UTF-8 byte": lambda line: line[:40] + b"\xff" + line[40:],
    "a truncated line": lambda line: line[: len(line) // 2] + b"\n",
}


@pytest.mark.parametrize("mutate", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_a_malformed_line_is_skipped_and_counted(tmp_path, mutate):
    lines = _jsonl_lines(tmp_path)
    lines[4] = mutate(lines[4])  # the record of t = 5, with distributions
    path = tmp_path / "lrscope.jsonl"
    path.write_bytes(b"".join(lines))
    run = plot.load(tmp_path)
    assert run.notes == [f"skipped 1 malformed line in {path} (line 5)"]
    assert run.groups["lr-Adam/pg0"]["step_size"].steps.tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    assert run.groups["lr-Adam/pg0"]["effective_lr/p50"].steps.tolist() == [1, 9]


def test_lrscope_plot_draws_the_rest_of_a_log_with_a_malformed_line(tmp_path, capsys):
    lines = _jsonl_lines(tmp_path)
    lines[4] = _MALFORMED["nested JSON bomb"](lines[4])
    path = tmp_path / "lrscope.jsonl"
    path.write_bytes(b"".join(lines))
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "out.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"note: skipped 1 malformed line in {path} (line 5)\n"
    assert captured.out == f"wrote {tmp_path / 'out.png'}\n"
    _check_png(tmp_path / "out.png")


def _mutations(line: bytes, rng: np.random.Generator) -> bytes:
    """One random change that makes ``line`` malformed (never one that leaves it valid)."""
    record = json.loads(line)
    group = int(rng.integers(len(record["groups"])))
    scalars = [("t",), ("groups", group, "lr"), ("groups", group, "step_size")]
    if record["groups"][group]["effective_lr"] is not None:
        scalars += [("groups", group, "effective_lr", "p50"), ("groups", group, "update_to_param"),
                    ("groups", group, "params", "layer1.bias", "effective_lr", "p95")]
    containers = [("groups",), ("groups", group), ("groups", group, "params"),
                  ("groups", group, "extra")]
    bad_values = ['"x"', "true", "[]", "{}", "1e400", "NaN", "-Infinity", "[" * 500 + "]" * 500, _DEEP]
    kind = rng.integers(5)
    if kind == 0:
        at = int(rng.integers(1, len(line) - 1))
        return line[:at] + bytes([int(rng.integers(0x80, 0x100))]) + line[at:]
    if kind == 1:
        return line[: int(rng.integers(0, len(line) - 2))] + b"\n"
    if kind == 2:
        path = scalars[int(rng.integers(len(scalars)))]
        return _replace(line, path, bad_values[int(rng.integers(len(bad_values)))])
    if kind == 3:
        required = [("t",), ("optimizer",), ("groups",), ("groups", group, "name")]
        return _replace(line, required[int(rng.integers(len(required)))], None)
    path = containers[int(rng.integers(len(containers)))]
    return _replace(line, path, ['"x"', "1", "[1]" if path[-1] != "groups" else "{}"][int(rng.integers(3))])


@pytest.mark.parametrize("parser", ["orjson", "json"])
def test_random_single_line_mutations_are_all_plotted_and_counted(tmp_path, monkeypatch, parser):
    """100 seeded single-line mutations of a real log (a non-UTF-8 byte, a cut, a value of
    the wrong type, out of range or nested 100,000 deep, a missing key, a container of the
    wrong type): every one is read, with the bad line counted and every other step kept,
    by orjson (the plot extra's parser) and by json alone alike."""
    if parser == "json":
        monkeypatch.setattr(logs, "_fast_loads", None)
    else:
        pytest.importorskip("orjson")
    steps = 12
    lines = _jsonl_lines(tmp_path, steps)
    rng = np.random.default_rng(12)
    path = tmp_path / "lrscope.jsonl"
    for _ in range(100):
        index = int(rng.integers(len(lines)))
        mutated = list(lines)
        mutated[index] = _mutations(lines[index], rng)
        path.write_bytes(b"".join(mutated))
        run = plot.load(tmp_path)
        assert run.notes == [f"skipped 1 malformed line in {path} (line {index + 1})"], mutated[index][:200]
        kept = [t for t in range(1, steps + 1) if t != index + 1]
        assert run.groups["lr-Adam/pg1"]["lr"].steps.tolist() == kept
    plot.draw(run, tmp_path / "last.png")
    _check_png(tmp_path / "last.png")


def test_several_malformed_lines_make_one_note(tmp_path, capsys):
    lines = _jsonl_lines(tmp_path)
    lines[1], lines[6] = b"\x00\x01garbage\n", b'{"t": null}\n'
    (tmp_path / "lrscope.jsonl").write_bytes(b"".join(lines))
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().err == (
        f"note: skipped 2 malformed lines in {tmp_path / 'lrscope.jsonl'} (the first: line 2)\n")


def test_only_malformed_lines_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "lrscope.jsonl").write_bytes(b'{"t": 1e400, "optimizer": "Adam", "groups": []}\n\xff\n')
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no lrscope data" in err and "skipped 2 malformed lines" in err


def _plot_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``lrscope plot`` in a child process: a hang (a FIFO opened for reading) fails the test."""
    return subprocess.run([sys.executable, "-m", "lrscope.cli", "plot", *args], capture_output=True,
                          text=True, timeout=timeout)


def _entries_named_like_event_files(directory) -> list[str]:
    """A directory, a symlink loop, a dangling symlink and a FIFO, all named like event files."""
    (directory / "events.out.tfevents.1.dir").mkdir()
    os.symlink("events.out.tfevents.2.loop", directory / "events.out.tfevents.2.loop")
    os.symlink("missing", directory / "events.out.tfevents.3.dangling")
    os.mkfifo(directory / "events.out.tfevents.4.fifo")
    return ["events.out.tfevents.1.dir", "events.out.tfevents.2.loop", "events.out.tfevents.3.dangling",
            "events.out.tfevents.4.fifo"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks")
def test_event_file_names_that_are_not_regular_files_are_skipped(tmp_path):
    pytest.importorskip("tensorboardX")
    from lrscope.sinks.tensorboard import TensorBoardSink

    raws = _log(tmp_path, [TensorBoardSink(tmp_path, params=True)])
    names = _entries_named_like_event_files(tmp_path)
    result = _plot_subprocess(str(tmp_path), "--png", str(tmp_path / "tb.png"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("note: skipped 4 entries named like event files that are not "
                                     "regular files: ")
    assert all(name in result.stderr for name in names)
    _check_png(tmp_path / "tb.png")
    _check_run(plot.load(tmp_path), raws)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks")
def test_only_event_file_names_that_are_not_files_is_a_one_line_error(tmp_path):
    _entries_named_like_event_files(tmp_path)
    result = _plot_subprocess(str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no lrscope data" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_a_jsonl_log_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "lrscope.jsonl")
    for target in (tmp_path, tmp_path / "lrscope.jsonl"):
        result = _plot_subprocess(str(target))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_or_truncated_event_file_keeps_what_it_can(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    from lrscope.sinks.tensorboard import TensorBoardSink

    raws = _log(tmp_path, [TensorBoardSink(tmp_path, params=True)])
    [events] = tmp_path.glob("*tfevents*")
    (tmp_path / "events.out.tfevents.9.garbage").write_bytes(bytes(range(256)) * 40)
    data = events.read_bytes()
    events.write_bytes(data[: len(data) - 100])  # a writer killed mid-record
    assert main(["plot", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "events.out.tfevents.9.garbage" in err, err
    run = plot.load(tmp_path)
    assert run.groups["lr-Adam/pg0"]["step_size"].steps.tolist()[:8] == list(range(1, 9))
    assert raws


# --- Where the figure goes: only where asked, never through a symlink ------------------------


def test_the_default_png_is_not_written_through_a_symlink(tmp_path, capsys):
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("keep me")
    os.symlink(outside, tmp_path / "lrscope.png")
    for args in ([str(tmp_path)], [str(tmp_path), "--png", str(tmp_path / "lrscope.png")]):
        assert main(["plot", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "symbolic link" in err and "Traceback" not in err
        assert outside.read_text() == "keep me" and (tmp_path / "lrscope.png").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrscope.jsonl", "lrscope.png"]


def test_png_without_extension_is_written_exactly_there(tmp_path, capsys):
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "figure")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'figure'}\n"
    _check_png(tmp_path / "figure")
    assert not (tmp_path / "figure.png").exists()


def test_png_naming_another_format_is_refused(tmp_path, capsys):
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "figure.pdf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".pdf" in err and not (tmp_path / "figure.pdf").exists()


def test_png_naming_a_directory_writes_lrscope_png_in_it(tmp_path, capsys):
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    out = tmp_path / "figures"
    out.mkdir()
    assert main(["plot", str(tmp_path), "--png", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out / 'lrscope.png'}\n"
    _check_png(out / "lrscope.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "lrscope.jsonl"]
    assert [p.name for p in out.iterdir()] == ["lrscope.png"]


def test_an_existing_png_is_replaced_and_no_temporary_file_is_left(tmp_path, capsys):
    _log(tmp_path, [JsonlSink(tmp_path / "lrscope.jsonl")])
    (tmp_path / "lrscope.png").write_text("old")
    assert main(["plot", str(tmp_path)]) == 0
    _check_png(tmp_path / "lrscope.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrscope.jsonl", "lrscope.png"]


# --- Long logs: downsampled while reading --------------------------------------------------------

_LIGHT = ('{"wall_time":1.0,"t":%d,"name":null,"optimizer":"Adam","framework":"torch","family":"adam",'
          '"skipped":false,"empirical":false,"notes":[],"groups":[{"name":"pg0","lr":%r,"step_size":%r,'
          '"weight_decay_rate":0.0,"extra":{},"shape":[],"effective_lr":null,"update_magnitude":null,'
          '"update_norm":null,"param_norm":null,"update_to_param":%s,"params":{}}]}\n')


def _long_log(path, steps: int, spike_at: int, ranks: int = 1) -> None:
    """A log of ``steps`` steps (Adam's step size, an update ratio drawn at random with one
    spike), written by ``ranks`` processes at once."""
    rng = np.random.default_rng(0)
    ratios = rng.uniform(1e-4, 2e-3, steps)
    ratios[spike_at - 1] = 0.5
    with open(path, "w") as handle:
        for t in range(1, steps + 1):
            for _ in range(ranks):
                handle.write(_LIGHT % (t, 1e-3, step_size_at(t, 0), repr(float(ratios[t - 1]))))
    return ratios


def test_a_long_log_is_downsampled_while_reading(tmp_path):
    steps = 200_000
    ratios = _long_log(tmp_path / "lrscope.jsonl", steps, spike_at=123_457)
    run = plot.load(tmp_path)
    step_size = run.groups["lr-Adam/pg0"]["step_size"]
    ratio = run.groups["lr-Adam/pg0"]["update_to_param"]
    for series in (step_size, ratio):
        assert 1000 < series.steps.size < 20_000  # the figure's resolution, not the log's length
        assert np.all(np.diff(series.steps) > 0) and series.steps[0] == 1 and series.steps[-1] == steps
    # every value drawn is one logged, and the extremes are kept: the spike, the lowest ratio
    assert np.array_equal(ratio.values, ratios[ratio.steps - 1])
    assert ratio.values.max() == 0.5 and ratio.values.min() == ratios.min()
    expected = np.array([step_size_at(t, 0) for t in step_size.steps])
    assert np.allclose(step_size.values, expected, rtol=1e-12)
    # the first steps, where a log step axis spreads them out, are all there (Adam's dip at t = 12)
    assert step_size.steps[:100].tolist() == list(range(1, 101))


def test_all_ranks_in_one_log_dir_read_in_linear_time(tmp_path):
    """Every record goes back in t (4 ranks writing one log_dir): the purge rule keeps the
    last rank's records; reading is as fast as a log of that many lines should be."""
    import time

    steps = 25_000
    _long_log(tmp_path / "lrscope.jsonl", steps, spike_at=7, ranks=4)
    start = time.perf_counter()
    run = plot.load(tmp_path)
    elapsed = time.perf_counter() - start
    ratio = run.groups["lr-Adam/pg0"]["update_to_param"]
    assert ratio.steps[0] == 1 and ratio.steps[-1] == steps and ratio.values.max() == 0.5
    assert ratio.steps.size < 20_000
    assert run.notes == [plot.restart_notes([("lr-Adam", 1, 1)] * (3 * steps))[0]]
    assert elapsed < 60


def test_a_log_read_by_several_processes_reads_as_in_one_pass(tmp_path):
    """A long log is split between processes: restarts at and across their boundaries,
    ranks interleaved, two optimizers and malformed lines read as one pass reads them."""
    from lrscope import plot_data

    lines = []
    for t in list(range(1, 301)) + list(range(150, 401)) + [t for t in range(401, 501) for _ in (0, 1)]:
        lines.append(_LIGHT % (t, 1e-3 * (1 + t % 7), step_size_at(t, 0), repr(1e-3 * (1 + t % 13))))
        if t % 3 == 0:
            lines.append((_LIGHT % (t, 2e-3, 1e-4, "null")).replace('"name":null', '"name":"critic"'))
    lines[77], lines[500] = "{broken\n", '{"t": -1}\n'
    path = tmp_path / "lrscope.jsonl"
    path.write_text("".join(lines))
    one = plot_data._read_jsonl(path, workers=1)
    for workers in (2, 5):
        several = plot_data._read_jsonl(path, workers=workers)
        assert several[1] == one[1] == [f"skipped 2 malformed lines in {path} (the first: line 78)"]
        assert several[0].restarts == one[0].restarts
        assert sorted(one[0].restarts) == ["lr-Adam", "lr-critic"]
        runs = [points.run("x", notes) for points, notes in (one, several)]
        assert runs[0].groups.keys() == runs[1].groups.keys() == {"lr-Adam/pg0", "lr-critic/pg0"}
        for key, metrics in runs[0].groups.items():
            for metric, series in metrics.items():
                assert np.array_equal(series.steps, runs[1].groups[key][metric].steps), (key, metric)
                assert np.array_equal(series.values, runs[1].groups[key][metric].values)
    steps = one[0].run("x", []).groups["lr-Adam/pg0"]["lr"].steps
    assert steps[0] == 1 and steps[-1] == 500 and steps.size >= 498 and np.all(np.diff(steps) > 0)


def test_a_line_longer_than_the_limit_is_skipped_unread(tmp_path, monkeypatch):
    from lrscope import logs

    lines = _jsonl_lines(tmp_path)
    record = json.loads(lines[2])
    record["notes"] = ["x" * 50_000]  # a valid record, but longer than the limit
    lines[2] = (json.dumps(record) + "\n").encode()
    path = tmp_path / "lrscope.jsonl"
    path.write_bytes(b"".join(lines))
    monkeypatch.setattr(logs, "MAX_LINE_BYTES", 40_000)
    run = plot.load(tmp_path)
    assert run.notes == [f"skipped 1 malformed line in {path} (line 3)"]
    assert run.groups["lr-Adam/pg0"]["lr"].steps.tolist() == [1, 2, 4, 5, 6, 7, 8, 9]
