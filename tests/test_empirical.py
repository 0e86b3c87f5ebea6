"""What a user gets for a step lrscope reads without a hook, or for an optimizer it does
not model: ``lrscope.torch.elementwise`` right after ``step()`` (no bare KeyError), and
the measured (empirical) mode in every framework with a monitor and in the callbacks."""

from __future__ import annotations

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
import lrscope.torch  # noqa: E402
from lrscope.torch import optimizers  # noqa: E402
from lrscope.torch import reader as backend  # noqa: E402
from lrscope.torch.state import elementwise_of  # noqa: E402


def adafactor_params(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"vector": (5,), "matrix": (4, 3), "cube": (2, 3, 4)}
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for n, s in shapes.items()}
    # RMS(theta) below eps2 = 1e-3: the step is scaled by eps2, not by the RMS.
    params["tiny"] = torch.nn.Parameter(1e-5 * torch.randn(6, generator=g, dtype=dtype))
    return params, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("options", [dict(lr=0.01), dict(lr=0.5, weight_decay=0.1, maximize=True, d=2.0)],
                         ids=["plain", "wd-maximize-clip"])
def test_elementwise_of_adafactor_right_after_step(options, dtype):
    """torch's Adafactor scales its step by RMS(theta before the step), which the step
    overwrites and a hook records (watch); ``elementwise`` without one recovers it from
    theta after the step (one quadratic, as for Keras' Adafactor) and satisfies the
    identity against the real step, with the eta of the recorded RMS."""
    params, g = adafactor_params(dtype)
    optimizer = torch.optim.Adafactor(params.values(), **options)
    relative = 1e-10 if dtype == torch.float64 else 2e-5
    for step in range(1, 5):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        before = {n: p.detach().clone() for n, p in params.items()}
        recorded = backend.TorchReader(optimizer).begin(0, distributions=True).recorded
        optimizer.step()
        got = dict(lrscope.torch.elementwise(optimizer))
        group = optimizer.param_groups[0]
        h, _ = optimizers.hyperparameters("adafactor", group, group["lr"])
        for index, (name, p) in enumerate(params.items()):
            el = got[f"param{index}"]
            delta = (p.detach() - before[name]).double()
            predicted = (-el.eta * el.direction - el.decay_rate * before[name]).double()
            torch.testing.assert_close(delta, predicted, rtol=0, atol=relative * delta.abs().max().item())
            exact = elementwise_of("adafactor", optimizer.state[p], p, h, recorded[id(p)])
            torch.testing.assert_close(el.eta, exact.eta, rtol=relative, atol=0)
    report = lrscope.inspect(optimizer)
    assert report.groups[0].params["param1"].effective_lr.count == 12 and not any(
        "not recorded" in note for note in report.notes)


def test_elementwise_of_adadelta_says_what_it_needs():
    """Adadelta's eta reads the accumulated deltas from before the step, which the step
    overwrote: a clear error naming watch(), not a bare KeyError."""
    w = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = torch.optim.Adadelta([w])
    w.grad = torch.randn(3, 4)
    optimizer.step()
    with pytest.raises(ValueError, match=r"Adadelta.*before the step.*watch\("):
        dict(lrscope.torch.elementwise(optimizer))


# --- The callbacks: measured mode where lrscope does not model the step -----------------


def _hf_trainer(tmp_path, callback, optim="adafactor", steps=3):
    transformers = pytest.importorskip("transformers")
    from tests.test_transformers import Data, Regression

    class Realized(transformers.TrainerCallback):
        """||delta theta|| of every optimizer step, measured independently of lrscope."""

        def __init__(self):
            self.norms = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.norms.append({n: (p.detach() - self.before[n]).norm().item() for n, p in model.named_parameters()})

    realized = Realized()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        optim=optim, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=Regression(), args=args, train_dataset=Data(),
                                   callbacks=[callback, realized])
    return trainer, realized


def test_hf_callback_measures_an_optimizer_lrscope_does_not_model(tmp_path):
    """optim="adafactor" is transformers' own Adafactor, which lrscope does not model: the
    callback measures its realized update by default, and its one warning says so, what it
    costs and how to turn it off."""
    import lrscope.transformers

    callback = lrscope.transformers.EffectiveLRCallback(every=1)
    trainer, realized = _hf_trainer(tmp_path, callback)
    with pytest.warns(RuntimeWarning, match=r"Adafactor is not .*measured .*one copy of the parameters.*"
                                            r"empirical=False") as record:
        trainer.train()
    assert len([w for w in record if "empirical=" in str(w.message)]) == 1  # one warning says it
    records = list(lrscope.logs.read_jsonl(tmp_path / "lrscope" / "lrscope.jsonl"))
    assert [r["t"] for r in records] == [1, 2, 3] and all(r["empirical"] for r in records)
    for record, norms in zip(records, realized.norms):
        params = {n: p for group in record["groups"] for n, p in group["params"].items()}  # (biases: no decay)
        assert set(params) == set(norms)
        for name, norm in norms.items():
            assert params[name]["update_norm"] == pytest.approx(norm, rel=1e-5)
            assert params[name]["update_magnitude"]["count"] > 0
    assert all(group.update_magnitude is not None for group in callback.last.groups)


def test_hf_callback_without_measured_mode_says_how_to_turn_it_on(tmp_path):
    import lrscope.transformers

    callback = lrscope.transformers.EffectiveLRCallback(every=1, empirical=False)
    trainer, _ = _hf_trainer(tmp_path, callback, steps=1)
    with pytest.warns(RuntimeWarning, match=r"pass empirical=True .*one copy of the parameters"):
        trainer.train()
    assert callback.last.groups[0].update_magnitude is None and not callback.last.empirical


def test_lightning_callback_measures_an_optimizer_lrscope_does_not_model(tmp_path):
    pytest.importorskip("lightning")
    import lightning

    import lrscope.lightning
    from tests.conftest import CollectSink
    from tests.test_lightning import Regression, _data

    class Unmodelled(Regression):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)

    for empirical, measured in ((None, True), (False, False), (True, True)):
        sink = CollectSink()
        options = {} if empirical is None else {"empirical": empirical}
        callback = lrscope.lightning.EffectiveLRMonitor(every=1, sinks=[sink], loggers=False, **options)
        trainer = lightning.Trainer(max_steps=2, callbacks=[callback], logger=False, accelerator="cpu",
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        with pytest.warns(RuntimeWarning, match="empirical=False" if measured else "pass empirical=True"):
            trainer.fit(Unmodelled(), _data())
        assert [r.t for r in sink.reports] == [1, 2]
        group = sink.reports[-1].groups[0]
        assert (group.update_magnitude is not None) == measured == sink.reports[-1].empirical
        if measured:
            assert group.update_magnitude.count == sum(p.numel() for p in Unmodelled().parameters())
