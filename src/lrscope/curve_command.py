"""``lrscope curve``: the data-independent step size alpha_t, as a table, CSV or PNG.

    lrscope curve adam --lr 1e-3 --steps 10000 --schedule cosine --warmup 500 \\
        --framework torch,keras --csv adam.csv --png adam.png
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrscope import formulas, schedules
from lrscope.formulas import CONVENTIONS

#: Steps shown in the table (those <= --steps, plus the last one).
TABLE_STEPS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000,
               50_000, 100_000, 200_000, 500_000, 1_000_000)


@dataclass
class Curve:
    """One framework's curve: the lr each step used and every step-size term."""

    framework: str
    lr: np.ndarray
    terms: dict[str, np.ndarray]

    @property
    def step_size(self) -> np.ndarray:
        return self.terms["step_size"]


def _hyper(args: argparse.Namespace) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    if args.betas is not None:
        hyper["betas"] = tuple(args.betas)
    if args.eps is not None:
        hyper["eps"] = args.eps
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        hyper[key] = _parse_value(value)
    return hyper


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _check_schedule_options(args: argparse.Namespace) -> None:
    """One-line errors for schedule options no schedule can use."""
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if not 0 < args.gamma < math.inf:
        raise ValueError(f"--gamma must be finite and > 0, got {args.gamma}")
    if not 0 <= args.min_lr < math.inf:
        raise ValueError(f"--min-lr must be finite and >= 0, got {args.min_lr}")


def _schedule(args: argparse.Namespace, lr: float) -> schedules.Schedule:
    name = args.schedule
    if name == "constant":
        return schedules.constant(lr)
    if name == "step":
        return schedules.step(lr, every=args.every, gamma=args.gamma)
    if name == "exponential":
        return schedules.exponential(lr, gamma=args.gamma)
    if name == "warmup":
        return schedules.warmup(lr, warmup=args.warmup)
    if name == "cosine":
        return schedules.cosine(lr, steps=args.steps, warmup=args.warmup, min_lr=args.min_lr)
    return schedules.onecycle(lr, steps=args.steps)


def compute(args: argparse.Namespace) -> list[Curve]:
    """One Curve per requested framework (each with its own default lr unless --lr)."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    _check_schedule_options(args)
    frameworks = [f.strip() for f in args.framework.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in CONVENTIONS]
    if unknown or not frameworks:
        raise ValueError(f"unknown framework {unknown}; choose from {', '.join(CONVENTIONS)}")
    module = formulas.family(args.optimizer)
    missing = [f for f in frameworks if f not in module.DEFAULTS]
    if missing:
        raise ValueError(
            f"{args.optimizer!r} does not exist in {', '.join(missing)}; "
            f"it exists in {', '.join(c for c in CONVENTIONS if c in module.DEFAULTS)}"
        )
    hyper = _hyper(args)
    t = np.arange(1, args.steps + 1)
    curves = []
    for framework in frameworks:
        given = {**hyper, **({"lr": args.lr} if args.lr is not None else {})}
        h = formulas.checked(formulas.hyperparameters(args.optimizer, framework, **given))
        h["lr"] = schedules.evaluate(_schedule(args, float(h["lr"])), t - 1)
        terms = module.step_sizes(np, t, h, framework)
        curves.append(Curve(framework, h["lr"],
                            {k: np.broadcast_to(np.asarray(v, float), t.shape) for k, v in terms.items()}))
    return curves


def facts(curve: Curve) -> list[str]:
    """What a user is after: alpha_1/lr, the dip, when alpha_t reaches 99 % of lr."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = curve.step_size / curve.lr  # NaN where the schedule gives lr = 0
    lines = [f"alpha_1/lr = {ratio[0]:.4g}"]
    if np.all(np.isnan(ratio)):
        return lines
    dip = int(np.nanargmin(ratio))
    if 0 < dip < len(ratio) - 1:
        lines.append(f"dip: alpha_t/lr = {ratio[dip]:.4g} at t = {dip + 1}")
    reached = np.nonzero(ratio[dip:] >= 0.99)[0]
    if reached.size:
        lines.append(f"alpha_t first reaches 99% of lr at t = {dip + reached[0] + 1}")
    else:
        lines.append(f"alpha_t stays below 99% of lr for all {len(ratio)} steps")
    return lines


def print_table(optimizer: str, curves: list[Curve]) -> None:
    """Well-chosen steps as rows; the lr once if shared, then each framework's terms."""
    from rich.console import Console
    from rich.table import Table

    steps = len(curves[0].lr)
    shown = sorted({s for s in TABLE_STEPS if s <= steps} | {steps})
    shared_lr = all(np.array_equal(c.lr, curves[0].lr) for c in curves)
    several = len(curves) > 1
    columns: list[tuple[str, np.ndarray]] = []
    for i, curve in enumerate(curves):
        suffix = f" {curve.framework}" if several else ""
        if not shared_lr or i == 0:
            columns.append((f"lr{suffix if not shared_lr else ''}", curve.lr))
        columns.extend((f"{term}{suffix}", values) for term, values in curve.terms.items())
        if not several:
            with np.errstate(divide="ignore", invalid="ignore"):
                columns.append(("step_size/lr", curve.step_size / curve.lr))
    table = Table(title=f"{optimizer}: step size alpha_t per step t", title_justify="left")
    table.add_column("t", justify="right")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for s in shown:
        table.add_row(str(s), *(f"{values[s - 1]:.4g}" for _, values in columns))
    console = Console(width=max(100, 14 * len(columns) + 10))
    console.print(table)
    for curve in curves:
        console.print(f"[bold]{curve.framework}[/bold]: " + "; ".join(facts(curve)), soft_wrap=True)


def write_csv(path: str, curves: list[Curve]) -> None:
    """One row per step: t, then lr and every term (suffixed by framework when several)."""
    several = len(curves) > 1
    columns: list[tuple[str, np.ndarray]] = []
    for curve in curves:
        suffix = f"_{curve.framework}" if several else ""
        columns.append((f"lr{suffix}", curve.lr))
        columns.extend((f"{term}{suffix}", values) for term, values in curve.terms.items())
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t"] + [name for name, _ in columns])
        for i in range(len(curves[0].lr)):
            writer.writerow([i + 1] + [repr(float(values[i])) for _, values in columns])


def write_png(path: str, optimizer: str, curves: list[Curve]) -> None:
    """lr and alpha_t on one chart, log step axis."""
    from lrscope._optional import require

    require("matplotlib", "plot").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    t = np.arange(1, len(curves[0].lr) + 1)
    for curve in curves:
        label = f" ({curve.framework})" if len(curves) > 1 else ""
        ax.plot(t, curve.lr, linestyle="--", label=f"scheduled lr{label}")
        for term, values in curve.terms.items():
            ax.plot(t, values, label=f"{term}{label}")
    ax.set_xscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{optimizer}: scheduled lr vs bias-corrected step size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    curves = compute(args)
    print_table(args.optimizer, curves)
    if args.csv:
        write_csv(args.csv, curves)
        print(f"wrote {args.csv}")
    if args.png:
        write_png(args.png, args.optimizer, curves)
        print(f"wrote {args.png}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "curve", help="the data-independent step size alpha_t of an optimizer",
        description="Print (and save) the bias-corrected step size alpha_t, step by step.",
    )
    parser.add_argument("optimizer", help="adam, adamw, nadam, radam, adamax, sgd, adagrad, "
                        "rmsprop, adadelta, adafactor, lion, ...")
    parser.add_argument("--lr", type=float, help="base learning rate (default: the framework's)")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"))
    parser.add_argument("--eps", type=float)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any other hyperparameter, e.g. --set momentum_decay=0.004")
    parser.add_argument("--schedule", choices=sorted(schedules.BY_NAME), default="constant")
    parser.add_argument("--warmup", type=int, default=0, help="warmup steps (warmup, cosine)")
    parser.add_argument("--gamma", type=float, default=0.1, help="decay factor (step, exponential)")
    parser.add_argument("--every", type=int, default=1000, help="steps between decays (step)")
    parser.add_argument("--min-lr", type=float, default=0.0, help="final lr (cosine)")
    parser.add_argument("--framework", default="torch",
                        help=f"comma-separated conventions: {','.join(CONVENTIONS)}")
    parser.add_argument("--csv", help="write one row per step to this CSV file")
    parser.add_argument("--png", help="draw lr and alpha_t to this PNG file")
    parser.set_defaults(run=run)
