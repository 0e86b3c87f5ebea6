"""Findings: every rule holds for a real run that exhibits it, and not for a healthy run.

Each case trains a tiny model with torch for a few dozen steps, watched with the JSONL sink;
the live monitor's findings and ``lrscope check``'s, read back from the log, must both
name the rule.  Rules about the end of a run are judged at ``close()``.
"""

from __future__ import annotations

import warnings

import pytest

from lrscope.findings import RULES, Checker
from lrscope.findings.command import check
from lrscope.findings.observe import from_record
from lrscope.report import GroupReport, StepReport

torch = pytest.importorskip("torch")
nn = torch.nn

import lrscope  # noqa: E402
from lrscope.sinks import JsonlSink  # noqa: E402


def mlp(dtype=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    return model if dtype is None else model.to(dtype)


def train(tmp_path, model, optimizer, steps, *, scheduler=None, loss_scale=None, before_step=None,
          after_step=None, forward=None, **watch):
    """Train ``steps`` steps watched by lrscope (JSONL in tmp_path); the closed monitor."""
    monitor = lrscope.watch(optimizer, model=model, sinks=[JsonlSink(tmp_path / "lrscope.jsonl")],
                            **watch)
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the findings' own warnings are tested below
        for t in range(1, steps + 1):
            x = torch.randn(32, 8, generator=generator).to(dtype)
            out = model(x) if forward is None else forward(model, x)
            loss = (out - 2 * x[:, :1]).pow(2).mean() * (1.0 if loss_scale is None else loss_scale(t))
            optimizer.zero_grad()
            loss.backward()
            if before_step is not None:
                before_step(t, model)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(t, optimizer)
        monitor.close()
    return monitor


def ids(findings):
    return {f.id for f in findings}


def offline_ids(tmp_path):
    _, findings = check(str(tmp_path))
    return ids(findings)


def split_decay(model, weight_decay):
    """AdamW-style groups: matrices decayed, biases and norms not."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


# -- a run for each rule ---------------------------------------------------------------------

def huge_eps(tmp_path):
    model = mlp()
    return train(tmp_path, model, torch.optim.Adam(model.parameters(), lr=1e-3, eps=10.0), 5)


def shrinking_gradients(tmp_path):
    # The loss scale drops 1e12-fold at step 10 (an unscaled loss, a loss going to 0); with
    # beta2 = 0.1, v follows within twenty steps and eps takes over.
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.1))
    return train(tmp_path, model, optimizer, 35, loss_scale=lambda t: 1.0 if t <= 10 else 1e-12)


def dead_branch(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 1), "unused": nn.Linear(8, 1)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    # 0 * unused(x): the gradient reaches it and is exactly zero, every step.
    return train(tmp_path, model, optimizer, 25,
                 forward=lambda m, x: m["used"](x) + 0 * m["unused"](x))


def half_precision_states(tmp_path):
    # float16 parameters and states: g ~ 1e-3 gives (1 - beta2) * g**2 below float16's
    # smallest subnormal while (1 - beta1) * g survives.
    model = mlp(torch.float16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    return train(tmp_path, model, optimizer, 3, loss_scale=lambda t: 1e-3)


def nan_gradient(tmp_path):
    def poison(t, model):
        if t == 4:
            model[0].weight.grad[0, 0] = float("nan")

    model = mlp()
    return train(tmp_path, model, torch.optim.Adam(model.parameters(), lr=1e-3), 6, before_step=poison)


def huge_lr(tmp_path):
    model = mlp()
    return train(tmp_path, model, torch.optim.Adam(model.parameters(), lr=0.5), 5)


class _Scale(nn.Module):
    def forward(self, x):
        return x * 1e-4


def huge_norm_layer(tmp_path):
    # One matrix 1e4 times larger than usual (compensated by a fixed scale): Adam moves it by
    # lr per element like the others, a 1e-4 fraction of its norm: frozen in effect.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), _Scale(), nn.Linear(16, 16), nn.Linear(16, 1))
    with torch.no_grad():
        model[1].weight.mul_(1e4)
    return train(tmp_path, model, torch.optim.Adam(model.parameters(), lr=1e-3), 3)


def exploding_sgd(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    return train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=3.0), 8)


def adamw_on_everything(tmp_path):
    model = mlp()
    return train(tmp_path, model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01), 3)


def huge_weight_decay(tmp_path):
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 50.0), lr=1e-3)
    return train(tmp_path, model, optimizer, 30)


def schedule_to_zero(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: max(0.0, 1 - epoch / 5))
    return train(tmp_path, model, optimizer, 8, scheduler=scheduler)


def warmup_from_zero(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: min(1.0, epoch / 3))
    return train(tmp_path, model, optimizer, 5, scheduler=scheduler)


def short_warmup(tmp_path):
    # beta2 = 0.95: Adam wants about 2 / (1 - 0.95) = 40 steps of warmup; this one has 10.
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 0.01), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    return train(tmp_path, model, optimizer, 15, scheduler=scheduler)


def group_by_hand(tmp_path):
    # The second group's lr is written by hand after each scheduler step.
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 0.0), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9 ** epoch)

    def pin(t, opt):
        opt.param_groups[1]["lr"] = 1e-3

    return train(tmp_path, model, optimizer, 5, scheduler=scheduler, after_step=pin)


def scheduler_first(tmp_path):
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 0.01), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: (epoch + 1) / 10)
    monitor = lrscope.watch(optimizer, model=model, sinks=[JsonlSink(tmp_path / "lrscope.jsonl")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            scheduler.step()  # before optimizer.step(): the schedule's first lr is skipped
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        monitor.close()
    return monitor


def prodigy_early(tmp_path):
    prodigyopt = pytest.importorskip("prodigyopt")
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    return train(tmp_path, model, prodigyopt.Prodigy(model.parameters(), lr=1.0), 12)


def muon_beside_adam(tmp_path, adam_lr=1e-6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    adam = torch.optim.AdamW([p for p in model.parameters() if p.ndim < 2], lr=adam_lr, weight_decay=0)
    log = tmp_path / "lrscope.jsonl"
    monitors = [lrscope.watch(muon, model=model, sinks=[JsonlSink(log)], empirical=True),
                lrscope.watch(adam, model=model, sinks=[JsonlSink(log)])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = torch.randn(16, 8)
            (model(x) - x[:, :1]).pow(2).mean().backward()
            muon.step()
            adam.step()
            muon.zero_grad()
            adam.zero_grad()
        for monitor in monitors:
            monitor.close()
    return None  # judged offline: the two optimizers have separate monitors


CASES = {
    "eps_dominated": huge_eps,
    "eps_dominated_growing": shrinking_gradients,
    "no_gradient": dead_branch,
    "second_moment_underflow": half_precision_states,
    "nonfinite": nan_gradient,
    "update_ratio_high": huge_lr,
    "update_ratio_outlier": huge_norm_layer,
    "divergence": exploding_sgd,
    "decay_on_norms_and_biases": adamw_on_everything,
    "decay_exceeds_update": huge_weight_decay,
    "lr_zero": schedule_to_zero,
    "warmup_starts_at_zero": warmup_from_zero,
    "warmup_shorter_than_bias_correction": short_warmup,
    "lr_off_schedule": group_by_hand,
    "scheduler_stepped_before_optimizer": scheduler_first,
    "adaptive_d_still_growing": prodigy_early,
    "muon_step_mismatch": muon_beside_adam,
}


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule_id", CASES)
def test_a_run_that_exhibits_the_rule_has_it(rule_id, tmp_path):
    monitor = CASES[rule_id](tmp_path)
    if monitor is not None:
        assert rule_id in ids(monitor.findings)
    assert rule_id in offline_ids(tmp_path)  # the live-only rule: as the monitor recorded it


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """AdamW on matrices only, 50 steps of warmup (beta2 = 0.95 needs 40), then decay."""
    tmp_path = tmp_path_factory.mktemp("healthy")
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 0.01), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: min(1.0, 0.1 + 0.9 * epoch / 50) * (0.99 ** max(0, epoch - 50)))
    return train(tmp_path, model, optimizer, 60, scheduler=scheduler), tmp_path


def test_a_healthy_run_has_no_finding(healthy):
    monitor, tmp_path = healthy
    assert monitor.findings == []
    assert offline_ids(tmp_path) == set()


def test_healthy_variants_of_the_schedule_and_family_cases(tmp_path):
    model = mlp()
    optimizer = torch.optim.AdamW(split_decay(model, 0.01), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: (epoch + 1) / 10)
    monitor = lrscope.watch(optimizer, sinks=[])
    for _ in range(3):  # the right order
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    monitor.close()
    assert monitor.findings == []
    muon_beside_adam(tmp_path / "muon", adam_lr=2e-3)  # about Muon's per-element update
    assert "muon_step_mismatch" not in offline_ids(tmp_path / "muon")


def _report(t, d):
    group = GroupReport(name="pg0", lr=1.0, step_size=d, weight_decay_rate=0.0, extra={"d": d})
    return StepReport(t=t, optimizer="Prodigy", framework="torch", family="prodigy", groups=[group])


def test_a_settled_d_is_no_finding():
    checker = Checker()
    for t in range(1, 101):
        checker.feed(_report(t, 1e-3 * min(t, 50)))  # grows, then flat for the last half
    assert checker.finish() == []
    still = Checker()
    for t in range(1, 101):
        still.feed(_report(t, 1e-3 * t))
    assert [f.id for f in still.finish()] == ["adaptive_d_still_growing"]


def test_live_warnings_once_per_rule_and_subject(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: max(0.0, 1 - epoch / 3))
    log = tmp_path / "lrscope.jsonl"
    monitor = lrscope.watch(optimizer, sinks=[JsonlSink(log)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        monitor.close()
    about = [str(w.message) for w in caught if "[lr_zero]" in str(w.message)]
    assert len(about) == 1 and "at step 4" in about[0] and RULES["lr_zero"].explanation in about[0]
    assert [(f.id, f.steps) for f in monitor.findings] == [("lr_zero", [(4, 8)])]
    from lrscope.logs import read_jsonl

    recorded = [(r["t"], [f["id"] for f in r.get("findings", [])]) for r in read_jsonl(log)]
    assert [t for t, found in recorded if found] == [4]  # written once, where it first held
    assert recorded[3][1] == ["lr_zero"]


def test_findings_false_checks_nothing():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = lrscope.watch(optimizer, sinks=[], findings=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        monitor.close()
    assert monitor.findings == [] and monitor.last.findings == []
    assert not [w for w in caught if "lrscope finding" in str(w.message)]


def test_the_sinks_write_new_findings():
    import io

    from rich.console import Console

    from lrscope.sinks import ConsoleSink, TensorBoardSink

    class Writer:
        texts: list = []

        def add_text(self, tag, text, global_step=None):
            self.texts.append((tag, text, global_step))

        def add_custom_scalars(self, layout):
            pass

        def add_scalar(self, tag, value, global_step=None):
            pass

        def add_histogram_raw(self, tag, **histogram):
            pass

        def flush(self):
            pass

    out, writer = io.StringIO(), Writer()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = lrscope.watch(optimizer, sinks=[ConsoleSink(100, console=Console(file=out, width=200)),
                                              TensorBoardSink(writer=writer)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            optimizer.param_groups[0]["lr"] = 0.0  # from the second step on
        monitor.close()
    assert out.getvalue().count("lrscope warning [lr_zero] lr-SGD/pg0 (steps 2): lr was 0") == 1
    assert [(tag, step) for tag, text, step in writer.texts if "`lr_zero`" in text] == [
        ("lr-SGD/findings", 2)]


def test_a_record_and_its_report_give_the_same_step():
    report = StepReport(t=3, optimizer="Adam", framework="torch", family="adam", name="gen",
                        groups=[GroupReport(name="pg0", lr=1e-3, step_size=2e-4, weight_decay_rate=0.0)])
    live, offline = Checker(), Checker()
    assert from_record(report.to_dict()).prefix == "lr-gen"
    assert live.feed(report) == [] and offline.feed(report.to_dict()) == []


def test_unknown_rule_ids_are_refused():
    with pytest.raises(ValueError, match="unknown rule id"):
        Checker(ignore=["no_such_rule"])
