"""PyTorch in real training situations: groups, names, sparse gradients, unknown
optimizers, unsupported options, checkpoints, GradScaler, wrappers, torch.compile."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def train_step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_groups_names_and_group_quantiles():
    model = make_model()
    optimizer = torch.optim.AdamW([
        {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 0.1, "name": "encoder"},
        {"params": model[2].parameters(), "lr": 1e-3, "betas": (0.5, 0.9)},
    ])
    with lrscope.watch(optimizer, model=model) as monitor:
        for seed in range(3):
            train_step(model, optimizer, seed)
    report = monitor.last
    assert [g.name for g in report.groups] == ["encoder", "pg1"]
    assert list(report.groups[0].params) == ["0.weight", "0.bias"]
    assert report.groups[0].weight_decay_rate == pytest.approx(1e-3)
    assert report.groups[1].step_size == pytest.approx(1e-3 * (1 - 0.9**3) ** 0.5 / (1 - 0.5**3))
    # The group distribution is the merge of its tensors: compare with numpy on the real eta.
    etas = dict(lrscope.torch.elementwise(optimizer, model))
    eta = np.concatenate([etas[n].eta.detach().numpy().ravel() for n in ("0.weight", "0.bias")])
    dist = report.groups[0].effective_lr
    assert dist.count == eta.size and dist.min == pytest.approx(eta.min()) and dist.max == pytest.approx(eta.max())
    for q in (0.01, 0.25, 0.5, 0.75, 0.99):
        assert dist.quantile(q) == pytest.approx(np.quantile(eta, q), rel=0.01)
    scalars = report.scalars()
    assert scalars["lr-AdamW/encoder/lr"] == pytest.approx(1e-2)
    assert "lr-AdamW/pg1/effective_lr/p50" in scalars and "lr-AdamW/pg1/update_to_param" in scalars


@pytest.mark.parametrize("cls,options", [(torch.optim.SparseAdam, {"lr": 0.05}),
                                         (torch.optim.SparseAdam, {"lr": 0.05, "maximize": True}),
                                         (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01})])
def test_sparse_gradients_identity(cls, options):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4, sparse=True).double()
    optimizer = cls(embedding.parameters(), **options)
    monitor = lrscope.watch(optimizer, model=embedding)
    for step in range(1, 5):
        before = embedding.weight.detach().clone()
        rows = torch.tensor([step % 10, (3 * step) % 10, 7])
        optimizer.zero_grad()
        embedding(rows).pow(2).sum().backward()
        optimizer.step()
        (name, el), = lrscope.torch.elementwise(optimizer, embedding)
        delta = embedding.weight.detach() - before
        torch.testing.assert_close(delta, -el.eta * el.direction - el.decay_rate * before, rtol=0, atol=1e-15)
        untouched = torch.ones(10, dtype=torch.bool)
        untouched[rows] = False
        assert torch.all(delta[untouched] == 0)
        assert monitor.last.groups[0].params["weight"].effective_lr.count == 40
    monitor.close()


class OverridesStep(torch.optim.SGD):
    """A custom optimizer: lrscope must not guess what its step does."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("make", [lambda ps: OverridesStep(ps, lr=0.01),
                                  lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=0.02)],
                         ids=["subclass-overriding-step", "muon-unregistered"])
def test_unknown_optimizer_reports_lr_and_empirical_update(make, monkeypatch):
    from lrscope import registry

    # Muon as lrscope leaves it where torch lacks the Newton-Schulz function it re-runs.
    monkeypatch.delitem(registry._MODELS, getattr(torch.optim, "Muon", None), raising=False)
    model = make_model()
    optimizer = make(list(model.parameters()))
    with pytest.warns(RuntimeWarning, match="empirical=True") as record:
        plain = lrscope.watch(optimizer)
    assert record[0].filename == __file__  # the user's line, not lrscope's
    train_step(model, optimizer, 0)
    assert plain.last.groups[0].effective_lr is None and plain.last.groups[0].lr == optimizer.param_groups[0]["lr"]
    plain.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = lrscope.watch(optimizer, model=model, empirical=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, optimizer, 1)
    report = monitor.last
    assert report.empirical and report.family is None
    for name, param in report.groups[0].params.items():
        delta = (dict(model.named_parameters())[name].detach() - before[name]).abs().numpy().ravel()
        dist = param.update_magnitude
        assert dist.count == delta.size and dist.max == pytest.approx(delta.max())
        assert dist.quantile(0.5) == pytest.approx(np.quantile(delta, 0.5), rel=0.01)
        assert param.update_norm == pytest.approx(np.linalg.norm(delta))
    monitor.close()


def test_empirical_update_of_a_closure_optimizer_from_its_first_step():
    """LBFGS computes the gradients inside step(closure): there are none when the pre-hook
    snapshots the parameters, and the first step's update used to be missing."""
    model = make_model()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=2)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(16, 2)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = lrscope.watch(optimizer, model=model, empirical=True)
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step(closure)
        params = monitor.last.groups[0].params
        assert sorted(params) == sorted(before)
        for name, p in model.named_parameters():
            assert params[name].update_norm == pytest.approx(torch.linalg.norm(p.detach() - before[name]).item())
            assert params[name].update_norm > 0
    monitor.close()


def test_unsupported_option_is_reported_not_mis_modelled():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.param_groups[0]["shiny_new_flag"] = True  # as a future torch release might add
    with lrscope.watch(optimizer) as monitor:
        train_step(model, optimizer, 0)
    group = monitor.last.groups[0]
    assert group.effective_lr is None
    assert any("shiny_new_flag=True" in note and "not modelled" in note for note in monitor.last.notes)
    with pytest.raises(ValueError, match="shiny_new_flag"):
        dict(lrscope.torch.elementwise(optimizer))


def test_checkpoint_restores_t_and_state():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for seed in range(5):
        train_step(model, optimizer, seed)
    checkpoint = optimizer.state_dict()
    fresh = make_model()
    fresh.load_state_dict(model.state_dict())
    resumed = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    resumed.load_state_dict(checkpoint)
    with lrscope.watch(resumed) as monitor:
        train_step(fresh, resumed, 5)
    assert monitor.last.t == 6
    assert monitor.last.groups[0].step_size == pytest.approx(lrscope.step_size("adam", 6, lr=1e-3))


def test_grad_scaler_skipped_step_is_reported_as_skipped():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    monitor = lrscope.watch(optimizer, grad_scaler=scaler)
    reports = []
    for seed, poison in ((0, False), (1, True), (2, False)):
        optimizer.zero_grad()
        x = torch.randn(4, 6)
        loss = model(x).sum() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        reports.append((monitor.last.t, monitor.last.skipped, moved))
    monitor.close()
    assert reports == [(1, False, True), (1, True, False), (2, False, True)]
    assert scaler.update.__self__ is scaler  # close() restored the scaler


@pytest.mark.parametrize("device_path", [False, True], ids=["host flag", "flag in the device transfer"])
def test_fused_step_skipped_by_its_own_inf_flag(device_path, monkeypatch):
    """A fused optimizer runs its step under GradScaler even with inf gradients and skips
    inside the kernel (torch hands it the ``found_inf`` flag): the skipped step is reported
    as skipped with t unchanged, whether or not the monitor was given the scaler.  On the
    CPU the flag is read at once; on a device (the path run here on the CPU by treating it
    as one) it travels with a measured step's statistics, and steps without distributions
    read nothing, so they count the skipped step until the next measured one."""
    if device_path:
        from lrscope.torch import small as torch_small, stats as torch_stats

        monkeypatch.setattr(torch_stats, "on_host", lambda device: False)
        monkeypatch.setattr(torch_small, "SMALL_ELEMENTS", 0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    reports = []
    with lrscope.watch(optimizer, every=1) as monitor:
        for seed in range(4):
            optimizer.zero_grad()
            loss = model(torch.randn(4, 6)).sum() * (float("inf") if seed == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            state_t = int(optimizer.state[model[0].weight]["step"])
            reports.append((monitor.last.t, monitor.last.skipped, state_t))
    assert reports == [(1, False, 1), (1, True, 1), (2, False, 2), (3, False, 3)]
    assert monitor.last.groups[0].step_size == pytest.approx(lrscope.step_size("adam", 3, lr=1e-3))


def test_wrapped_optimizer_and_compiled_model():
    model = make_model()
    compiled = torch.compile(model, backend="eager")

    class Wrapper:  # like Lightning's LightningOptimizer or accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    with lrscope.watch(Wrapper(optimizer), model=compiled) as monitor:
        train_step(compiled, optimizer, 0)
    assert list(monitor.last.groups[0].params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert monitor.last.groups[0].effective_lr.min == monitor.last.groups[0].effective_lr.max == 0.1


class DelegatingOptimizer(torch.optim.Optimizer):
    """Shaped like accelerate's AcceleratedOptimizer: an Optimizer subclass that skips
    Optimizer.__init__ and shares the inner optimizer's param groups and state."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


class LookaheadLike(DelegatingOptimizer):
    """Shaped like torch_optimizer's Lookahead: skips Optimizer.__init__ too, but keeps slow
    weights of its own and pulls the parameters towards them after the inner step."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.slow_state = {}

    @property
    def state(self):
        return self.slow_state

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            for p in self.param_groups[0]["params"]:
                slow = self.slow_state.setdefault(p, {"slow_param": p.detach().clone()})["slow_param"]
                p.mul_(0.5).add_(slow, alpha=0.5)
                slow.copy_(p)
        return loss


def test_optimizer_subclass_that_delegates_is_unwrapped():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with lrscope.watch(DelegatingOptimizer(inner), model=model, every=2) as monitor:
        for seed in range(3):
            train_step(model, DelegatingOptimizer(inner), seed)
    assert monitor.last.optimizer == "AdamW" and monitor.last.t == 3
    etas = dict(lrscope.torch.elementwise(inner, model))
    assert monitor.last.groups[0].params["0.weight"].effective_lr.max == pytest.approx(
        etas["0.weight"].eta.max().item())


def test_optimizer_subclass_without_hooks_is_refused_before_any_log(tmp_path):
    model = make_model()
    lookahead = LookaheadLike(torch.optim.Adam(model.parameters(), lr=1e-2))
    with pytest.raises(TypeError, match=r"LookaheadLike subclasses torch.optim.Optimizer without "
                       r"calling Optimizer.__init__.*lrscope.watch\(optimizer.optimizer\)"):
        lrscope.watch(lookahead, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()
    train_step(model, lookahead, 0)
    report = lrscope.inspect(lookahead)  # after each step instead: the lr, and a note
    assert report.groups[0].lr == 1e-2 and "LookaheadLike is not a torch.optim optimizer" in report.notes[0]


def test_compiled_optimizer_step():
    """torch.compile of a function calling optimizer.step(): lrscope's hooks run untraced,
    so the distributions are measured (no warning) and training is as without lrscope."""
    runs = []
    for watched in (True, False):
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = torch.compile(optimizer.step, backend="eager")
        monitor = lrscope.watch(optimizer, every=2) if watched else None
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="lrscope")
            for seed in range(4):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(16, 6, generator=g)
                optimizer.zero_grad()
                model(x).pow(2).mean().backward()
                step()
                if watched:
                    assert monitor.last.t == seed + 1
                    assert (monitor.last.groups[0].effective_lr is not None) == (seed % 2 == 0)
        if watched:
            monitor.close()
        runs.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device_path", [False, True], ids=["CPU path", "device path, tensors batched"])
def test_nonfinite_state_is_counted_and_training_untouched(device_path, monkeypatch):
    """NaN in one tensor's state: that tensor is redone with masks (alone), the others,
    measured in the same batch on the device path, keep their finite statistics."""
    from lrscope.torch import stats as torch_stats

    if device_path:
        monkeypatch.setattr(torch_stats, "on_host", lambda device: False)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, optimizer, 0)
    optimizer.state[model[0].weight]["exp_avg_sq"][0, :3] = float("nan")
    with lrscope.watch(optimizer, model=model) as monitor:
        train_step(model, optimizer, 1)
    params = monitor.last.groups[0].params
    dist = params["0.weight"].effective_lr
    assert dist.nonfinite == 3 and np.isfinite(dist.min) and np.isfinite(dist.quantile(0.5))
    for name in ("0.bias", "2.weight", "2.bias"):
        assert params[name].effective_lr.nonfinite == 0 and np.isfinite(params[name].effective_lr.mean)


def test_inspect_notes_what_it_cannot_know():
    model = make_model()
    optimizer = torch.optim.Adadelta(model.parameters())
    train_step(model, optimizer, 0)
    report = lrscope.inspect(optimizer)
    assert report.t == 1 and report.groups[0].effective_lr is None
    assert any("watch()" in note for note in report.notes)


def test_a_failing_measurement_warns_once_and_training_goes_on(monkeypatch):
    """If measuring the distributions raises (an error injected where the statistics are
    gathered, standing for a tensor type lrscope does not know), watch warns once and
    reports the scalars from then on; training is bitwise the same as unwatched."""
    from lrscope.torch import small as torch_small

    def unforeseen(items):
        raise RuntimeError("unforeseen tensor type")

    monkeypatch.setattr(torch_small, "measures", unforeseen)
    watched, plain = make_model(), make_model()
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (watched, plain)]
    with pytest.warns(RuntimeWarning, match="distributions failed .*unforeseen tensor type") as record:
        with lrscope.watch(optimizers[0], every=2) as monitor:
            for seed in range(5):
                train_step(watched, optimizers[0], seed)
                group = monitor.last.groups[0]
                assert monitor.last.t == seed + 1 and group.effective_lr is None
                assert group.step_size == pytest.approx(lrscope.step_size("adam", seed + 1, lr=1e-2), rel=1e-12)
    assert len(record) == 1 and record[0].filename == __file__
    for seed in range(5):
        train_step(plain, optimizers[1], seed)
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))


def test_two_optimizers_of_one_class_in_one_log_dir(tmp_path):
    """A GAN's generator and discriminator, both Adam, logged to one directory beside the
    user's own TensorBoard writer: name= keeps their tags, JSONL records and plotted curves
    apart, and no writer's event file overwrites another's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lrscope import plot
    from lrscope.logs import read_jsonl

    models = {"generator": make_model(), "discriminator": make_model()}
    lrs = {"generator": 1e-3, "discriminator": 4e-3}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=lrs[k]) for k, m in models.items()}
    SummaryWriter = require("tensorboardX").SummaryWriter

    own = SummaryWriter(str(tmp_path))  # the user's writer, started in the same second
    monitors = [lrscope.watch(optimizers[k], log_dir=tmp_path, name=k) for k in models]
    for seed in range(3):
        for k in models:
            train_step(models[k], optimizers[k], seed)
        own.add_scalar("loss", 1.0 / (seed + 1), seed + 1)
    for monitor in monitors:
        monitor.close()
    own.close()
    records = list(read_jsonl(tmp_path / "lrscope.jsonl"))
    assert sorted((r["name"], r["t"]) for r in records) == sorted((k, t) for k in models for t in (1, 2, 3))
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    run = plot.load(tmp_path)
    for k, lr in lrs.items():
        assert [e.value for e in events.Scalars(f"lr-{k}/pg0/lr")] == pytest.approx([lr] * 3)
        assert run.groups[f"lr-{k}/pg0"]["step_size"].values == pytest.approx(
            [lrscope.step_size("adam", t, lr=lr) for t in (1, 2, 3)])
    assert not any(tag.startswith("lr-Adam/") for tag in events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    with pytest.raises(ValueError, match="name must be"):
        lrscope.watch(optimizers["generator"], name="gan/generator")


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "no_model"])
def test_a_group_added_while_watched(with_model):
    """Unfreezing a layer with add_param_group mid-run: its tensors are measured and named
    (by the model, else by position) from the next step on."""
    model = make_model()
    optimizer = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    with lrscope.watch(optimizer, model=model if with_model else None) as monitor:
        train_step(model, optimizer, 0)
        optimizer.add_param_group({"params": model[0].parameters(), "lr": 1e-4, "name": "unfrozen"})
        train_step(model, optimizer, 1)
    first, added = monitor.last.groups
    names = (["2.weight", "2.bias"], ["0.weight", "0.bias"]) if with_model else \
        (["param0", "param1"], ["param2", "param3"])
    assert (list(first.params), list(added.params)) == names
    assert added.lr == 1e-4 and added.effective_lr.count == model[0].weight.numel() + model[0].bias.numel()
    want = [el.eta for _, el in lrscope.torch.elementwise(optimizer)][2:]
    assert added.effective_lr.max == pytest.approx(max(float(eta.max()) for eta in want), rel=1e-6)


def test_a_second_monitor_on_one_optimizer_is_said():
    """A notebook cell run twice attaches a second monitor: one warning says so, and both
    report; once both are closed, attaching again is silent."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters())
    first = lrscope.watch(optimizer, sinks=[])
    with pytest.warns(RuntimeWarning, match="already has 1 monitor") as record:
        second = lrscope.watch(optimizer, sinks=[])
    assert record[0].filename == __file__
    train_step(model, optimizer, 0)
    assert first.last.t == second.last.t == 1
    first.close()
    second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrscope.watch(optimizer, sinks=[]).close()


def test_a_model_in_place_of_the_optimizer_says_what_to_pass():
    model = make_model()
    with pytest.raises(TypeError, match="this is the model: pass its optimizer"):
        lrscope.watch(model)


def test_update_ratio_of_a_zero_tensor():
    """A warmup from lr 0 leaves a zero-initialised bias at zero on step 1: nothing moved,
    so its update_to_param is 0 (not 0/0 read as inf); a zero tensor that did move has an
    infinite ratio."""
    model = make_model()
    torch.nn.init.zeros_(model[2].bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 10)
    with lrscope.watch(optimizer, model=model) as monitor:
        train_step(model, optimizer, 0)
        bias = monitor.last.groups[0].params["2.bias"]
        assert monitor.last.groups[0].lr == 0.0 and torch.count_nonzero(model[2].bias) == 0
        assert (bias.update_norm, bias.param_norm, bias.update_to_param) == (0.0, 0.0, 0.0)
        scheduler.step()
        train_step(model, optimizer, 1)
    assert monitor.last.groups[0].params["2.bias"].update_to_param > 0
    with torch.no_grad():
        model[2].bias.zero_()
    moved = lrscope.inspect(optimizer, model=model).groups[0].params["2.bias"]
    assert moved.update_norm > 0 and moved.param_norm == 0 and moved.update_to_param == float("inf")


def test_scalar_steps_report_what_the_step_used_after_the_scheduler_moved():
    """Between distribution steps the report is built on access: it must still show the lr
    and betas the step used, not those OneCycleLR set afterwards for the next step."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=20)
    with lrscope.watch(optimizer, every=7) as monitor:
        for t in range(1, 11):
            lr, (beta1, beta2) = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]
            train_step(model, optimizer, t)
            scheduler.step()
            group = monitor.last.groups[0]
            assert monitor.last.t == t and group.lr == lr
            assert group.step_size == pytest.approx(lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t), rel=1e-12)
            assert (group.effective_lr is not None) == (t in (1, 8))


@pytest.mark.parametrize("family", ["AdamW", "SGD"])
@pytest.mark.parametrize("batched", [True, False], ids=["tensors batched", "tensor by tensor"])
def test_device_path_run_on_the_cpu(batched, family, monkeypatch):
    """The GPU code path, run on the CPU by treating it as a device: counts added with
    ``index_add_``, statistics packed on the device and moved, with the groups' step
    counters, by one ``to_host`` per measured step for all groups (none on the others);
    the same distributions as the CPU path, parameter by parameter, whether a group's
    tensors are measured together (``torch_stats.segment_results``) or one by one."""
    from lrscope.torch import small as torch_small, stats as torch_stats

    def train(device_path):
        model = make_model()
        optimizer = {"AdamW": torch.optim.AdamW, "SGD": functools.partial(torch.optim.SGD, momentum=0.9)}[family]([
            {"params": model[0].parameters(), "weight_decay": 0.1},
            {"params": model[2].parameters(), "lr": 1e-2}], lr=1e-3)  # (SGD: one eta per group)
        calls = []
        with monkeypatch.context() as patch:
            if device_path:
                patch.setattr(torch_stats, "on_host", lambda device: False)
                if not batched:
                    patch.setattr(torch_small, "DEVICE_BATCH_ELEMENTS", 0)
                patch.setattr(torch_stats, "PIECE_ELEMENTS", 5)  # segments of several uneven pieces
                patch.setattr(torch_stats, "LANES_MIN_ELEMENTS", 10)  # weights: counts in 32 copies
                real = torch_stats.to_host
                patch.setattr(torch_stats, "to_host", lambda *a: calls.append(a) or real(*a))
            with lrscope.watch(optimizer, model=model, every=2) as monitor:
                for seed in range(3):
                    train_step(model, optimizer, seed)
                    if device_path:  # one call on the measured steps 1 and 3
                        assert len(calls) == seed // 2 + 1
            return monitor.last, calls

    cpu, _ = train(False)
    device, calls = train(True)
    assert len(calls) == 2 and device.t == cpu.t == 3
    if family == "AdamW":
        assert set(calls[-1][1]) == {0, 1}  # both groups' step counters (tensors) moved along
    for g, h in zip(cpu.groups, device.groups):
        assert h.step_size == g.step_size and list(h.params) == list(g.params)
        for a, b in [(g, h), *zip(g.params.values(), h.params.values())]:
            x, y = a.effective_lr.sketch, b.effective_lr.sketch  # the same bucket counts
            assert y.count == x.count
            assert all(np.array_equal(u, v) for u, v in zip(x.positive + x.negative, y.positive + y.negative))
            assert (b.effective_lr.min, b.effective_lr.max) == (a.effective_lr.min, a.effective_lr.max)
            assert b.effective_lr.mean == pytest.approx(a.effective_lr.mean, rel=1e-6)
            assert b.effective_lr.eps_dominated_count == a.effective_lr.eps_dominated_count
            assert b.update_norm == pytest.approx(a.update_norm, rel=1e-6)
            assert b.param_norm == pytest.approx(a.param_norm, rel=1e-6)


def test_inspect_before_the_first_step_says_so():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = lrscope.inspect(optimizer)
    assert before.t == 0 and any("no optimizer step has been taken yet" in n for n in before.notes)
    train_step(model, optimizer, 0)
    after = lrscope.inspect(optimizer)
    assert after.t == 1 and not any("no optimizer step" in n for n in after.notes)
