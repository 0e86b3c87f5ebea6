"""The compiled (fused) statistics kernel against numpy on the family's exact eta.

Part sizes are shrunk so that small tensors take the fused path, in several parts on the
worker threads plus a shorter last one; a StepLR changes lr every step, which the kernel
must follow without a stale constant.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
from lrscope.torch import optimizers  # noqa: E402
from lrscope.torch.state import elementwise_of  # noqa: E402
from lrscope.stats import mapping  # noqa: E402
from lrscope.torch import fused as torch_fused, kernel as torch_kernel, small as torch_small, stats as torch_stats  # noqa: E402
from tests.test_torch_optimizers import CASES, make_optimizer, real, recorded_before  # noqa: E402

#: One case per chunkable family (Adafactor and Lamb factor over whole tensors, and RAdam
#: branches on t: eager).
FUSED_CASES = ["sgd-momentum-dampening-wd", "adam", "adam-amsgrad", "adamw-amsgrad-wd", "adam-tensor-lr",
               "adamax-wd", "nadam-decoupled-wd", "adagrad-decay-init-wd",
               "rmsprop-centered-momentum", "adadelta-wd-maximize", "rprop", "asgd-wd"]
STEPS = 7


@pytest.fixture
def small_chunks(monkeypatch):
    """The fused path from 300 elements on, in parts of 1024 elements (and a shorter last
    one), eager chunks of 512, and no kernel kept from another test.  Yields the list of
    fused tensors measured."""
    monkeypatch.setattr(torch_fused, "FUSED_MIN_ELEMENTS", 300)
    monkeypatch.setattr(torch_fused, "PART_ELEMENTS", 1024)
    monkeypatch.setattr(torch_stats, "CHUNK_ELEMENTS", 512)
    monkeypatch.setattr(torch_small, "SMALL_ELEMENTS", 299)  # only the bias is batched
    monkeypatch.setattr(torch_fused, "_kernels", {})
    monkeypatch.delenv("LRSCOPE_FUSED", raising=False)
    calls = []
    fused = torch_fused._fused
    monkeypatch.setattr(torch_fused, "_fused", lambda *args: calls.append(1) or fused(*args))
    return calls


@pytest.fixture
def builds(monkeypatch):
    """The list of kernels built (each a compilation of about a second)."""
    built = []
    build = torch_kernel.Kernel.build
    monkeypatch.setattr(torch_kernel.Kernel, "build", lambda *args: built.append(1) or build(*args))
    return built


def make_params(dtype, with_complex):
    g = torch.Generator().manual_seed(0)
    shapes = {"matrix": (61, 83), "vector": (3000,), "bias": (7,)}  # 5063 = 2*2048 + 512 + 455
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
              for name, shape in shapes.items()}
    if with_complex:
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        params["complex"] = torch.nn.Parameter(torch.randn(40, 30, generator=g, dtype=cdtype))
    return params


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params.values():
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(p.shape, generator=g) * 8 - 6)
        if p.is_complex():
            grad = torch.complex(grad, torch.randn(p.shape, generator=g, dtype=torch.float64))
        p.grad = grad.to(p.dtype)


def exact(family, optimizer, p, recorded):
    """eta, the eps-dominated count and the norms from the eager formula, in float64."""
    group = optimizer.param_groups[0]
    h, _ = optimizers.hyperparameters(family, group, group["lr"])
    el = elementwise_of(family, optimizer.state[p], p, h, recorded.get(id(p)))
    theta = real(p.detach())
    eta = np.broadcast_to(torch.as_tensor(el.eta).double().numpy(), theta.shape).ravel()
    eps = None if el.eps_dominated is None else int(torch.as_tensor(el.eps_dominated).sum())
    update = torch.as_tensor(el.update(theta)).double()
    return eta, eps, float(update.norm()), float(theta.double().norm())


@pytest.mark.parametrize("case_id,dtype", [(c, torch.float32) for c in FUSED_CASES] + [("adam", torch.float64)],
                         ids=[f"{c}-float32" for c in FUSED_CASES] + ["adam-float64"])
def test_fused_statistics_match_numpy(small_chunks, case_id, dtype):
    """float64 is checked on Adam only: each case costs a compilation."""
    _, cls, options, with_complex = next(c for c in CASES if c[0] == case_id)
    params = make_params(dtype, with_complex)
    optimizer = make_optimizer(cls, options, params)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    family = optimizers.family_of(optimizer)
    names = {id(p): f"param{i}" for i, p in enumerate(params.values())}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel failure would warn and go eager
        monitor = lrscope.watch(optimizer, findings=False)  # (findings warn about this run; not tested here)
        for step in range(1, STEPS + 1):
            set_grads(params, step)
            recorded = recorded_before(optimizer)
            optimizer.step()
            report = monitor.last
            for p in params.values():
                eta, eps, update_norm, param_norm = exact(family, optimizer, p, recorded)
                got = report.groups[0].params[names[id(p)]]
                dist = got.effective_lr
                where = f"{case_id} step {step} {names[id(p)]}"
                assert dist.count == eta.size, where
                assert dist.min == pytest.approx(eta.min(), rel=1e-6), where
                assert dist.max == pytest.approx(eta.max(), rel=1e-6), where
                assert dist.mean == pytest.approx(eta.mean(), rel=1e-5), where
                for q in (0.01, 0.25, 0.5, 0.75, 0.99):
                    assert abs(dist.quantile(q) - np.quantile(eta, q)) <= 0.01 * abs(np.quantile(eta, q)), where
                assert dist.eps_dominated_count == eps, where
                assert got.update_norm == pytest.approx(update_norm, rel=1e-4), where
                assert got.param_norm == pytest.approx(param_norm, rel=1e-6), where
            scheduler.step()
        monitor.close()
    assert small_chunks, "the fused path was not taken"


def test_nonfinite_state_is_redone_eagerly(small_chunks):
    w = torch.nn.Parameter(torch.randn(5000))
    optimizer = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.randn(5000)
    optimizer.step()
    optimizer.state[w]["exp_avg_sq"][[0, 2500, 4999]] = torch.tensor([float("nan"), float("inf"), 0.0])
    dist = lrscope.inspect(optimizer).groups[0].effective_lr
    v = optimizer.state[w]["exp_avg_sq"].double().numpy()
    eta = 1e-3 / (np.sqrt(v / (1 - 0.999)) + 1e-8)
    finite = eta[np.isfinite(eta)]
    assert small_chunks and dist.count == 5000 and dist.nonfinite == 1  # NaN; inf v gives eta 0
    assert dist.min == pytest.approx(finite.min(), rel=1e-6) and dist.max == pytest.approx(finite.max(), rel=1e-6)
    assert dist.mean == pytest.approx(finite.mean(), rel=1e-5)


def test_tensors_of_any_size_share_one_kernel(small_chunks, builds):
    """400 and 450 float64 elements, each one part: one kernel for both sizes, reused with a
    new lr and t, and eta's arithmetic in float64 as eager torch computes it."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for n in (400, 450)]
    optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-3)
    for step in (1, 2):
        lr = optimizer.param_groups[0]["lr"] = 1e-3 / step
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0 ** torch.linspace(-6, 0, p.numel())
        optimizer.step()
        report = lrscope.inspect(optimizer).groups[0]
        for i, p in enumerate(params):
            dist = report.params[f"param{i}"].effective_lr
            root = np.sqrt(optimizer.state[p]["exp_avg_sq"].numpy() / (1 - 0.999**step))
            eta = lr / (root + 1e-3)
            assert dist.count == p.numel()
            assert (dist.min, dist.max, dist.mean) == pytest.approx((eta.min(), eta.max(), eta.mean()), rel=1e-12)
            assert dist.eps_dominated_count == int((root < 1e-3).sum())
    assert len(small_chunks) == 4 and len(builds) == 1


def test_a_compiled_kernel_also_measures_the_smaller_tensors(small_chunks, builds, monkeypatch):
    """Once the large tensor (1000 elements) has compiled Adam's kernel, it also measures the
    100-element one, which was batched before; the 7-element one stays batched.  Both ways
    give that tensor the same statistics, those of numpy's eta."""
    monkeypatch.setattr(torch_fused, "COMPILED_MIN_ELEMENTS", 50)
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1000, 100, 7)]
    optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.linspace(-6, 0, p.numel())
    optimizer.step()
    first, second = (lrscope.inspect(optimizer).groups[0].params["param1"].effective_lr for _ in range(2))
    assert len(small_chunks) == 1 + 2 and len(builds) == 1  # the large one twice, the 100 once
    root = np.sqrt(optimizer.state[params[1]]["exp_avg_sq"].double().numpy() / (1 - 0.999))
    eta = (1e-3 / (root + 1e-4)).astype(np.float32)
    for dist in (first, second):
        assert dist.count == 100 and dist.eps_dominated_count == int((root < 1e-4).sum())
        assert (dist.min, dist.max, dist.mean) == pytest.approx((eta.min(), eta.max(), eta.mean()), rel=1e-6)
    for a, b in zip(first.sketch.positive, second.sketch.positive):  # the same buckets, the same counts
        np.testing.assert_array_equal(a, b)


def test_a_kernel_failure_warns_once_and_stays_eager(small_chunks, monkeypatch):
    def broken(source):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(torch_kernel.compiled, "compile_kernel", broken)
    w = torch.nn.Parameter(torch.randn(5000))
    optimizer = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.randn(5000)
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="adam failed \\(RuntimeError: no LLVM here\\)"):
        fused_failed = lrscope.inspect(optimizer).groups[0].effective_lr
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lrscope.inspect(optimizer)  # the failure is remembered: no second warning, no second try
    monkeypatch.setenv("LRSCOPE_FUSED", "0")
    eager = lrscope.inspect(optimizer).groups[0].effective_lr
    assert fused_failed.to_dict() == eager.to_dict()


def test_a_formula_that_branches_on_a_per_step_value_is_not_compiled():
    """The tracer's fake tensors have no value to branch on: such a formula raises rather
    than compiling the branch its example happened to take."""
    def formula(view):
        lr = view["lr"] * 2 if view["lr"] > 0.5 else view["lr"]
        return lr / view["v"], None, view["v"] * 0

    with pytest.raises(Exception, match="[Dd]ata.dependent|symbolic|GuardOnDataDependent"):
        torch_kernel.Kernel.build(formula, {"v": torch.ones(4), "param": torch.ones(4)},
                                  {"lr": torch.tensor(0.1, dtype=torch.float64)})


def test_divisions_rounded_as_in_eager_torch():
    """The kernel's bucket counts and extremes are those of eager torch for a formula of
    divisions: by a per-step scalar (a true float32 division, not a product with its
    reciprocal) and of a Python number by a tensor (``Tensor.__rtruediv__``: the
    reciprocal, then the product).  Either rounding changed moves a few elements in
    100,000 across a bucket boundary here."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1 << 17, generator=g) * 10.0 ** (torch.rand(1 << 17, generator=g) * 8 - 6)
    lr, bias = 1e-3, 1 - 0.999 ** 3

    def formula(view):
        return view["lr"] / (view["v"] / view["bias"] + 1e-8), None, view["v"] * 0

    kernel = torch_kernel.Kernel.build(formula, {"v": torch.ones(4), "param": torch.ones(4)},
                                       {name: torch.tensor(x, dtype=torch.float64) for name, x in
                                        (("lr", lr), ("bias", bias))}, frozenset({"lr", "bias"}))
    counts, out = np.zeros(mapping.FLOAT32_BUCKETS, np.int32), np.zeros(len(torch_kernel.STATISTICS))
    kernel.run({"v": v.numpy(), "param": v.numpy()}, {"lr": lr, "bias": bias}, counts, out)
    eta = formula({"lr": lr, "v": v, "bias": bias})[0].numpy()
    expected = np.bincount(eta.view(np.uint32) >> mapping.FLOAT32_SHIFT, minlength=mapping.FLOAT32_BUCKETS)
    assert np.array_equal(counts, expected)
    assert (out[0], out[1]) == (eta.min(), eta.max())


def test_switched_off_by_the_environment(small_chunks, monkeypatch):
    monkeypatch.setenv("LRSCOPE_FUSED", "0")
    w = torch.nn.Parameter(torch.randn(5000))
    optimizer = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.randn(5000)
    optimizer.step()
    lrscope.inspect(optimizer)
    assert not small_chunks


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.NAdam, torch.optim.Adamax],
                         ids=["adam", "nadam", "adamax"])
def test_a_new_lr_and_t_reuse_the_kernel(small_chunks, builds, cls):
    """t, lr and what depends on t alone (beta powers, NAdam's coefficients) are arguments
    of the kernel, not constants baked in: after the first measured step nothing compiles."""
    w = torch.nn.Parameter(torch.randn(5000))
    optimizer = cls([w], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with lrscope.watch(optimizer):
        for _ in range(6):
            w.grad = torch.randn(5000)
            optimizer.step()
            scheduler.step()
    assert len(small_chunks) == 6 and len(builds) == 1


@pytest.mark.parametrize("numpy_elements", [0, 1 << 14], ids=["torch-rows", "numpy-rows"])
def test_eager_chunks_reduced_in_torch_or_numpy(small_chunks, monkeypatch, numpy_elements):
    """Eager chunks are reduced by torch, or by numpy when small: both against numpy on
    the exact eta, NaN/Inf redo included."""
    monkeypatch.setenv("LRSCOPE_FUSED", "0")
    monkeypatch.setattr(torch_stats, "NUMPY_ELEMENTS", numpy_elements)
    w = torch.nn.Parameter(torch.randn(5000))
    optimizer = torch.optim.Adam([w], lr=1e-3, eps=1e-3)
    w.grad = torch.randn(5000)
    optimizer.step()
    optimizer.state[w]["exp_avg_sq"][[0, 2500]] = torch.tensor([float("nan"), 0.0])
    report = lrscope.inspect(optimizer).groups[0]
    dist, got = report.effective_lr, next(iter(report.params.values()))
    v = optimizer.state[w]["exp_avg_sq"].double().numpy()
    root = np.sqrt(v / (1 - 0.999))
    eta = 1e-3 / (root + 1e-3)
    finite = eta[np.isfinite(eta)]
    assert not small_chunks and dist.count == 5000 and dist.nonfinite == 1
    assert dist.min == pytest.approx(finite.min(), rel=1e-6) and dist.max == pytest.approx(finite.max(), rel=1e-6)
    assert dist.mean == pytest.approx(finite.mean(), rel=1e-5)
    assert dist.eps_dominated_count == int((root < 1e-3).sum())
    assert np.isnan(got.update_norm)  # the NaN element's update is NaN too
    assert got.param_norm == pytest.approx(float(w.detach().double().norm()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case_id", ["adam", "adamw-amsgrad-wd", "nadam-decoupled-wd"])
def test_half_precision_state_within_one_unit(small_chunks, case_id, dtype):
    """The kernel computes bfloat16/float16 formulas in float32 copies, without rounding
    every intermediate as eager kernels do: the fused statistics stay within about one unit
    of the state's dtype of the eager eta the real step used (``torch_fused``'s docstring)."""
    _, cls, options, _ = next(c for c in CASES if c[0] == case_id)
    params = {name: p.detach().to(dtype).requires_grad_() for name, p in make_params(torch.float32, False).items()}
    optimizer = make_optimizer(cls, options, params)
    family = optimizers.family_of(optimizer)
    unit = 2 * torch.finfo(dtype).eps  # two units of rounding, relative
    generator = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(1, 4):
            if dtype == torch.bfloat16:
                set_grads(params, step)
            else:  # float16's range: squares of gradients below 1e-4 would underflow v to 0
                for p in params.values():
                    p.grad = (torch.randn(p.shape, generator=generator) * 0.3 + 0.5).to(dtype)
            recorded = recorded_before(optimizer)
            optimizer.step()
        report = lrscope.inspect(optimizer).groups[0]
    for i, p in enumerate(params.values()):
        eta, eps, update_norm, param_norm = exact(family, optimizer, p, recorded)
        got = report.params[f"param{i}"]
        dist, where = got.effective_lr, f"{case_id} {dtype} param{i}"
        assert dist.count == eta.size and dist.nonfinite == 0, where
        assert dist.min == pytest.approx(eta.min(), rel=unit), where
        assert dist.max == pytest.approx(eta.max(), rel=unit), where
        assert dist.mean == pytest.approx(eta.mean(), rel=unit), where
        for q in (0.01, 0.5, 0.99):
            exact_q = np.quantile(eta, q)
            assert abs(dist.quantile(q) - exact_q) <= (0.01 + unit) * abs(exact_q), where
        assert abs(dist.eps_dominated_count - eps) <= 0.01 * eta.size, where
        assert got.update_norm == pytest.approx(update_norm, rel=unit), where
        assert got.param_norm == pytest.approx(param_norm, rel=1e-6), where
    assert small_chunks, "the fused path was not taken"
