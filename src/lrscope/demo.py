"""``lrscope demo``: train a small real model and show everything lrscope sees.

An MLP learns scikit-learn's bundled digits (8x8 images, no download) with AdamW,
linear warmup and cosine decay, two parameter groups (``decay``: weight matrices;
``no_decay``: biases and LayerNorm, the usual recipe), watched by ``lrscope.watch``.
The console shows a progress bar and, every few hundred steps, lrscope's table;
``--out`` (``runs/demo``) receives TensorBoard event files, ``lrscope.jsonl`` and the
figure ``lrscope.png``.  About 15 seconds for the default 5000 steps on 2 CPU cores.

What to look for: the step size alpha_t starts at 0.32 lr, dips to 0.15 lr near step
10 and climbs back over thousands of steps (Adam's bias correction); about 1 % of the
``decay`` group is eps-dominated, the first-layer weights of three pixels that are
blank in every image (zero gradient, so eta = lr / eps); update_to_param peaks at a
few times 1e-3 in warmup, then falls far below that folklore value as the easy task is
learned and the learning rate decays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lrscope._optional import require

#: Files of a previous demo run in ``--out``, removed so the logs describe one run.
_OUTPUTS = ("lrscope.jsonl", "lrscope.png", "events.out.tfevents.*")


def _data(seed: int) -> tuple[Any, Any, Any, Any]:
    """Standardized digits, 80/20 train/test split, as float32 torch tensors."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    mean, std = x[:split].mean(0), x[:split].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)  # blank pixels stay exactly 0
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    return x[:split], y[:split], x[split:], y[split:]


def _model_and_optimizer(steps: int, lr: float) -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(),
        nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(),
        nn.Linear(256, 10),
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "name": "decay", "weight_decay": 0.05},
         {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}], lr=lr)
    warmup = max(1, min(200, steps // 10))
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup),
                                                   eta_min=lr / 100),
    ], milestones=[warmup])
    return model, optimizer, scheduler


def _loop(model: Any, optimizer: Any, scheduler: Any, x_train: Any, y_train: Any, steps: int,
          every: int, batch_size: int, seed: int, sinks: list[Any], progress: Any) -> None:
    import torch

    import lrscope

    generator = torch.Generator().manual_seed(seed)
    with progress, lrscope.watch(optimizer, model=model, every=every, sinks=sinks):
        task = progress.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            batch = torch.randint(0, len(y_train), (batch_size,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 10 == 0 or step == steps - 1:
                progress.update(task, completed=step + 1, loss=loss.item())


def train(steps: int = 5000, out: str | Path = "runs/demo", every: int = 25,
          console: Any = None, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> Path:
    """Train the demo model for ``steps`` steps; returns the path of the PNG written.

    >>> import io, tempfile
    >>> from rich.console import Console
    >>> png = train(steps=3, every=1, out=tempfile.mkdtemp(), console=Console(file=io.StringIO()))
    >>> png.name, png.exists()
    ('lrscope.png', True)
    """
    require("torch", "demo")
    require("sklearn", "demo")
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lrscope import plot
    from lrscope.sinks.console import ConsoleSink
    from lrscope.sinks.defaults import default_sinks

    out = Path(out)
    for pattern in _OUTPUTS:
        for old in out.glob(pattern):
            old.unlink()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _data(seed)
    model, optimizer, scheduler = _model_and_optimizer(steps, lr)
    console = console or Console()
    table_every = max(every, (steps // 12) // every * every)
    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                        console=console, transient=True)
    sinks = [*default_sinks(out), ConsoleSink(table_every, console=progress.console)]
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # A model this small runs fastest on one thread, and several spin badly on a busy machine.
    torch.set_num_threads(1)
    try:
        _loop(model, optimizer, scheduler, x_train, y_train, steps, every, batch_size, seed,
              sinks, progress)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    png = out / "lrscope.png"
    plot.draw(plot.load(out), png)
    for line in (f"{steps} steps in {time.perf_counter() - started:.1f} s, test accuracy {accuracy:.1%}",
                 f"TensorBoard:  {_tensorboard_command()} --logdir {out}",
                 f"Figure:       {png}"):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    return png


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    out = Path(args.out)
    try:  # before training, not after it
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise ValueError(f"cannot write to --out {out} ({error.strerror or error}): "
                         "pass a directory you can write to") from error
    train(steps=args.steps, out=out, every=args.every)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a small real model (digits, AdamW, warmup+cosine) and show lrscope",
        description="Train an MLP on scikit-learn's digits with AdamW and warmup+cosine, "
                    "watched by lrscope; writes TensorBoard logs, lrscope.jsonl and lrscope.png "
                    "to --out (replacing those of a previous demo there).")
    parser.add_argument("--steps", type=int, default=5000, help="training steps (default 5000)")
    parser.add_argument("--out", default="runs/demo", help="log directory (default runs/demo)")
    parser.add_argument("--every", type=int, default=25,
                        help="steps between distribution measurements (default 25)")
    parser.set_defaults(run=run)


def _tensorboard_command() -> str:
    """``tensorboard`` if it is on PATH, else the one beside this Python (an unactivated venv)."""
    beside = Path(sys.executable).parent / "tensorboard"
    if shutil.which("tensorboard") or not beside.exists():
        return "tensorboard"
    return str(beside.relative_to(Path.cwd()) if beside.is_relative_to(Path.cwd()) else beside)
