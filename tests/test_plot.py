"""``lrscope plot``: reads JSONL or TensorBoard logs, draws a PNG, refuses non-lrscope dirs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lrscope import plot
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
