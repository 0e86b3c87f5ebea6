"""PyTorch entry points: ``watch``, ``inspect``, ``elementwise`` and ``TorchMonitor``.

>>> import torch, lrscope.torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = torch.optim.Adam([w], lr=1e-3)
>>> w.grad = torch.tensor([1.0, -2.0, 0.5])
>>> with lrscope.torch.watch(opt) as mon:
...     opt.step()
>>> mon.last.t, round(mon.last.groups[0].step_size, 7)
(1, 0.0003162)
>>> round(mon.last.groups[0].effective_lr.quantile(0.5), 3)    # lr / (|g| + eps) for g = 1
0.001
"""

from lrscope._optional import require

require("torch", "torch")

from lrscope.torch.monitor import TorchMonitor, elementwise, inspect, watch  # noqa: E402
from lrscope.torch.models import register_builtin  # noqa: E402

register_builtin()  # Muon and the third-party optimizers, through lrscope.register

__all__ = ["TorchMonitor", "elementwise", "inspect", "watch"]
