"""The Triton statistics kernel (``lrscope.torch.triton_kernel``) against the eager device
path (``stats.reduce``), tensor by tensor: bucket counts identical, statistics to float
tolerance (the eager path sums in the state's dtype, the kernel in float64).

The kernel's square roots and divisions are IEEE ones, as CUDA's eager kernels compute them;
torch's CPU square root (MKL's) is at times one unit in the last place off.  So on the CPU
an eta at the edge of its bucket may land in the next one: there the counts may differ by
the elements whose eager eta is the first or last float of its bucket, and by no others.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets there before triton is first
imported); the fixture lets CPU tensors take the kernel.  On a CUDA machine the same
tests run the compiled kernel on the GPU (``tools/gpu_check.sh``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest

from tests.conftest import require

torch = require("torch")
import lrscope  # noqa: E402
from lrscope.stats import mapping  # noqa: E402
from lrscope.torch import small as torch_small, stats as torch_stats, triton_kernel  # noqa: E402
from tests.test_torch_optimizers import CASES, make_optimizer  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a CUDA GPU or TRITON_INTERPRET=1")]
DEVICE = "cuda" if ON_GPU else "cpu"
BUCKETS = mapping.FLOAT32_BUCKETS
BLOCK = triton_kernel.BLOCK
#: Every torch.optim case with a per-element formula (RAdam stays eager: see
#: ``test_radam_and_one_element_tensors_stay_eager``; Adafactor needs whole tensors);
#: capturable steps only on a GPU.
TRITON_CASES = [c[0] for c in CASES if not c[0].startswith(("radam", "adafactor"))
                and (ON_GPU or not c[2].get("capturable"))]
#: Two elements, one block exactly, one more, several blocks and a remainder; and one
#: element (left to the eager path).  Without a model the report names them param0...
SIZES = (2, BLOCK, BLOCK + 1, 2 * BLOCK + 904, 1)


@pytest.fixture
def triton_path(monkeypatch):
    """The kernel for this machine's tensors (CPU ones through the interpreter), the eager
    device path as the reference, no kernel kept from another test.  Returns the list of
    the number of tensors each launch measured."""
    if not ON_GPU:
        monkeypatch.setattr(triton_kernel, "DEVICE_TYPES", ("cpu",))
        monkeypatch.setattr(torch_stats, "on_host", lambda device: False)
    monkeypatch.setattr(triton_kernel, "_kernels", {})
    monkeypatch.delenv("LRSCOPE_FUSED", raising=False)
    launches = []
    launch = triton_kernel.Compiled.launch

    def counted(self, items, finite_only):
        launches.append(len(items))
        return launch(self, items, finite_only)

    monkeypatch.setattr(triton_kernel.Compiled, "launch", counted)
    return launches


@pytest.fixture
def measured(monkeypatch):
    """The ``{name: (compute, param)}`` of every tensor measured (``small.measures``)."""
    items = {}
    measures = torch_small.measures
    monkeypatch.setattr(torch_small, "measures", lambda given: items.update(given) or measures(given))
    return items


def make_params(sizes=SIZES, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {f"param{i}": torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype).to(DEVICE))
            for i, n in enumerate(sizes)}


def step(optimizer, params, seed):
    """One step on gradients spanning ten orders of magnitude, a few of them zero."""
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        scale = 10.0 ** (torch.rand(p.shape, generator=g, dtype=torch.float64) * 10 - 8)
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
        grad[::97] = 0.0
        p.grad = grad.to(device=DEVICE, dtype=p.dtype)
    optimizer.step()


def at_bucket_edges(compute, param):
    """How many elements of ``param`` have an eager eta that is the first or last float32
    of its bucket (one unit in the last place from the next bucket)."""
    eta = torch_stats.eta_tensor(compute(slice(0, param.numel())))
    low = eta.to(torch.float32).reshape(-1).view(torch.int32) & ((1 << mapping.FLOAT32_SHIFT) - 1)
    edges = int(((low == 0) | (low == (1 << mapping.FLOAT32_SHIFT) - 1)).sum())
    return edges * param.numel() if eta.dim() == 0 else edges


def assert_same(got, expected, where, edges=0):
    """Packed rows (bucket counts, then ``report.STATISTICS``) of the kernel and the eager
    path; on the CPU, up to ``edges`` elements may have moved to a neighbouring bucket."""
    got, expected = got.cpu(), expected.cpu()
    moved = int((got[:BUCKETS] - expected[:BUCKETS]).abs().sum()) // 2
    assert got[:BUCKETS].sum() == expected[:BUCKETS].sum() and moved <= (0 if ON_GPU else edges), where
    (low, high, total, squares, eps, update, param), want = got[BUCKETS:].tolist(), expected[BUCKETS:].tolist()
    if math.isfinite(want[2]):  # (else NaN/Inf reached the sums: the extremes are redone masked)
        assert (low, high) == pytest.approx(want[:2], rel=1e-6), where
    assert (total, squares) == pytest.approx(want[2:4], rel=1e-5, nan_ok=True), where
    assert eps == want[4], where
    assert (update, param) == pytest.approx(want[5:], rel=1e-5, nan_ok=True), where


def assert_same_distribution(dist, want, where):
    """Distributions alike: counts equal, quantiles (clamped to min and max) and statistics
    to float tolerance."""
    assert (dist.count, dist.nonfinite, dist.eps_dominated_count) == \
        (want.count, want.nonfinite, want.eps_dominated_count), where
    quantiles = (0.0, 0.1, 0.5, 0.9, 1.0)
    assert [dist.quantile(q) for q in quantiles] == \
        pytest.approx([want.quantile(q) for q in quantiles], rel=1e-5), where
    assert (dist.min, dist.max, dist.mean) == pytest.approx((want.min, want.max, want.mean), rel=1e-5), where


def check_against_eager(items, finite_only=False):
    """Every tensor the kernel takes, in one ``measures`` call, against ``stats.reduce``."""
    measures = triton_kernel.measures(items)
    assert set(measures) == {name for name, (_, param) in items.items() if param.numel() > 1}
    for name, measure in measures.items():
        assert_same(measure(finite_only), torch_stats.reduce(*items[name], finite_only), name,
                    at_bucket_edges(*items[name]))


@pytest.mark.parametrize("case_id,dtype", [(c, torch.float32) for c in TRITON_CASES]
                         + [("adam", torch.float64), ("sgd-momentum-dampening-wd", torch.float64)],
                         ids=[f"{c}-float32" for c in TRITON_CASES] + ["adam-float64", "sgd-momentum-float64"])
def test_kernel_matches_the_eager_path(triton_path, measured, case_id, dtype):
    """Each family's formula, the tensors of a step in one launch; the watched step itself
    took the kernel and warned of nothing (a failing kernel warns and goes eager)."""
    _, cls, options, _ = next(c for c in CASES if c[0] == case_id)
    params = make_params(dtype=dtype)
    optimizer = make_optimizer(cls, options, params)
    for seed in range(2):
        step(optimizer, params, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with lrscope.watch(optimizer, findings=False) as monitor:
            step(optimizer, params, 2)
        assert triton_path == [len(SIZES) - 1]
        assert monitor.last.groups[0].params["param4"].effective_lr.count == 1
        check_against_eager(measured)


def test_nonfinite_and_eps_dominated_elements(triton_path, measured):
    """NaN, inf and zero second moments (eta NaN, 0 and lr/eps, eps-dominated): the fast
    pass counts them as the eager path does, the masked redo (``finite_only``) matches the
    eager one, and the report is the eager path's."""
    params = make_params()
    optimizer = torch.optim.Adam(params.values(), lr=1e-3, eps=1e-6)
    step(optimizer, params, 0)
    v = optimizer.state[params["param2"]]["exp_avg_sq"]
    v[[0, 5, BLOCK]] = torch.tensor([float("nan"), float("inf"), 0.0], device=DEVICE)
    report = lrscope.inspect(optimizer).groups[0].params
    check_against_eager(measured)
    check_against_eager(measured, finite_only=True)
    # the step's launch and its redo of the NaN tensor, then the checks' (one masked launch each)
    assert triton_path == [len(SIZES) - 1, 1, len(SIZES) - 1, 1, 1, 1, 1]
    os.environ["LRSCOPE_FUSED"] = "0"
    try:
        eager = lrscope.inspect(optimizer).groups[0].params
    finally:
        del os.environ["LRSCOPE_FUSED"]
    for name, got in report.items():
        assert_same_distribution(got.effective_lr, eager[name].effective_lr, name)
    dist = report["param2"].effective_lr
    assert dist.nonfinite == 1 and dist.eps_dominated_count >= 1


def test_tensors_share_launches_by_formula(triton_path, monkeypatch):
    """Tensors with one formula share a launch (up to ``GROUP_TENSORS``); a group with other
    hyperparameters, which the kernel bakes in, has its own kernel and launch."""
    monkeypatch.setattr(triton_kernel, "GROUP_TENSORS", 3)
    params = make_params(sizes=(5, 6, 7, 8, 9, 10))
    names = list(params)
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in names[:4]]},
                                   {"params": [params[n] for n in names[4:]], "weight_decay": 0.0}], lr=1e-3)
    step(optimizer, params, 0)
    lrscope.inspect(optimizer)
    assert triton_path == [3, 1, 2]
    assert len(triton_kernel._kernels) == 2


def test_radam_and_one_element_tensors_stay_eager(triton_path):
    """RAdam picks its regime with a Python branch on t (as for the CPU kernel), and a
    one-element tensor keeps its state unflattened: both are measured eagerly."""
    params = make_params(sizes=(1, 50))
    optimizer = torch.optim.RAdam(params.values(), lr=1e-3)
    step(optimizer, params, 0)
    report = lrscope.inspect(optimizer).groups[0].params
    assert not triton_path
    assert report["param0"].effective_lr.count == 1 and report["param1"].effective_lr.count == 50


def test_a_failing_kernel_warns_once_and_stays_eager(triton_path, monkeypatch):
    """A kernel that cannot be generated, or fails when launched: one warning, then the
    eager path's results."""
    params = make_params(sizes=(50, 60))
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    step(optimizer, params, 0)
    monkeypatch.setenv("LRSCOPE_FUSED", "0")
    eager = lrscope.inspect(optimizer).groups[0].effective_lr
    monkeypatch.delenv("LRSCOPE_FUSED")

    def broken(*args):
        raise RuntimeError("no compiler here")

    for where in ("_compile", "launch"):
        monkeypatch.setattr(triton_kernel, "_kernels", {})
        monkeypatch.setattr(*((triton_kernel, "_compile", broken) if where == "_compile"
                              else (triton_kernel.Compiled, "launch", broken)))
        with pytest.warns(RuntimeWarning, match="Triton statistics kernel.*RuntimeError: no compiler here"):
            failed = lrscope.inspect(optimizer).groups[0].effective_lr
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            again = lrscope.inspect(optimizer).groups[0].effective_lr
        assert failed.to_dict() == again.to_dict(), where
        assert_same_distribution(failed, eager, where)
