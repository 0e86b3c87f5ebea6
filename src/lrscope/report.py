"""What lrscope reports about one optimizer step: StepReport, GroupReport, Distribution.

A report describes the step *just taken* (SPEC §1): ``t`` is its 1-based index and
``lr`` is the learning rate that step used.

>>> import numpy as np
>>> eta = Distribution.from_array(np.array([1e-4, 2e-4, 4e-4]), eps_dominated=0)
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3.2e-4, weight_decay_rate=0.0,
...                     effective_lr=eta)
>>> report = StepReport(t=1, optimizer="Adam", framework="torch", family="adam", groups=[group])
>>> report.scalars()["lr-Adam/pg0/step_size"]
0.00032
>>> round(report.scalars()["lr-Adam/pg0/effective_lr/p50"], 6)
0.0002
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lrscope.stats import LogSketch

#: Quantiles reported for every distribution, by metric name.
QUANTILES: dict[str, float] = {
    "p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99,
}


@dataclass(eq=False)
class Distribution:
    """Distribution of a per-element quantity (effective lr, or |update| in empirical mode).

    ``eps_dominated`` is the fraction of elements whose denominator is dominated by
    eps (``None`` for families without one).
    """

    sketch: LogSketch
    eps_dominated_count: int | None = None

    @classmethod
    def from_array(cls, values: Any, eps_dominated: int | None = None) -> Distribution:
        return cls(LogSketch.from_array(values), eps_dominated)

    @classmethod
    def union(cls, dists: list[Distribution]) -> Distribution:
        """The distribution of all elements of ``dists`` (at least one)."""
        counts = [d.eps_dominated_count for d in dists]
        eps = None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]
        return cls(LogSketch.union([d.sketch for d in dists]), eps)

    count = property(lambda self: self.sketch.count, doc="Number of elements.")
    min = property(lambda self: self.sketch.min, doc="Exact minimum of the finite values.")
    max = property(lambda self: self.sketch.max, doc="Exact maximum of the finite values.")
    mean = property(lambda self: self.sketch.mean, doc="Exact mean of the finite values.")
    nonfinite = property(lambda self: self.sketch.nonfinite, doc="Number of NaN/Inf values.")

    def quantile(self, q: float) -> float:
        """Quantile of the finite values, within 1 % relative error."""
        return float(self.sketch.quantile(q))

    @property
    def eps_dominated(self) -> float | None:
        if self.eps_dominated_count is None:
            return None
        return self.eps_dominated_count / self.count if self.count else math.nan

    def histogram(self, bins_per_decade: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Log-spaced ``(edges, counts)`` of the positive values."""
        return self.sketch.histogram(bins_per_decade)

    def summary(self) -> dict[str, float]:
        """count, min, max, mean, the QUANTILES, nonfinite and eps_dominated as floats."""
        out = {"count": float(self.count), "min": self.min, "max": self.max, "mean": self.mean}
        quantiles = self.sketch.quantile(np.array(list(QUANTILES.values())))
        out.update({name: float(v) for name, v in zip(QUANTILES, np.atleast_1d(quantiles))})
        out["nonfinite"] = float(self.nonfinite)
        if self.eps_dominated is not None:
            out["eps_dominated"] = self.eps_dominated
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "sketch": self.sketch.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Distribution:
        """The Distribution that ``to_dict`` wrote (a JSONL record's ``effective_lr``), to
        merge with others (``union``) or query again.

        >>> d = Distribution.from_array(np.array([1e-3, 2e-3]), eps_dominated=1)
        >>> back = Distribution.from_dict(d.to_dict())
        >>> back.count, back.max, back.eps_dominated
        (2, 0.002, 0.5)
        """
        sketch = LogSketch.from_dict(data["sketch"])
        fraction = data.get("eps_dominated")
        return cls(sketch, None if fraction is None else round(fraction * sketch.count))


#: The reductions every device backend computes beside the float32 bucket counts, in this
#: order; -1 marks an absent eps-dominated count or update norm.
STATISTICS = ("min", "max", "sum", "sum_squares", "eps_dominated", "update_sq", "param_sq")


def mark_eps_absent(rows: Any) -> None:
    """Mark the eps-dominated count of ``STATISTICS`` rows (a numpy array or a tensor, the
    statistics along its last axis) absent, as ``decode_statistics`` reads it.

    >>> import numpy as np
    >>> row = np.zeros(len(STATISTICS))
    >>> mark_eps_absent(row)
    >>> decode_statistics([0], row, indices=[0])[0].eps_dominated is None
    True
    """
    rows[..., STATISTICS.index("eps_dominated")] = -1


def decode_statistics(counts: Any, scalars: Any,
                      indices: Any = None) -> tuple[Distribution, float | None, float]:
    """The Distribution, update norm (None if absent) and parameter norm of one tensor from
    its float32 bucket counts (all of them, or those of ``indices``) and its ``STATISTICS``.

    >>> import numpy as np
    >>> from lrscope.stats import mapping
    >>> ones = np.array([1.0, 1.0], np.float32).view(np.uint32) >> mapping.FLOAT32_SHIFT
    >>> dist, update, param = decode_statistics([2], [1.0, 1.0, 2.0, 2.0, -1, -1, 8.0], indices=ones[:1])
    >>> dist.count, dist.mean, dist.eps_dominated_count, update, param
    (2, 1.0, None, None, 2.8284271247461903)
    """
    named = dict(zip(STATISTICS, (float(x) for x in scalars)))
    sketch = LogSketch.from_float32_buckets(counts, indices=indices, min=named["min"], max=named["max"],
                                            sum=named["sum"], sum_squares=named["sum_squares"])
    eps = None if named["eps_dominated"] < 0 else int(named["eps_dominated"])
    update = None if named["update_sq"] < 0 else math.sqrt(named["update_sq"])
    return Distribution(sketch, eps), update, math.sqrt(named["param_sq"])


def needs_masked_redo(dist: Distribution) -> bool:
    """Whether statistics reduced without masks (a backend's fast pass) must be measured
    again with masking: NaN/Inf reached the sums, so min/max/mean are not those of the
    finite values."""
    return bool(dist.nonfinite) and not math.isfinite(dist.sketch.sum)


def _ratio(update_norm: float | None, param_norm: float | None) -> float | None:
    """||delta theta|| / ||theta||: 0 where nothing moved, even a zero tensor (lr 0 at the
    start of a warmup leaves a zero-initialised bias at zero), inf where a zero tensor moved.

    >>> _ratio(1.0, 4.0), _ratio(0.0, 0.0), _ratio(1.0, 0.0), _ratio(None, 1.0)
    (0.25, 0.0, inf, None)
    """
    if update_norm is None or param_norm is None:
        return None
    if update_norm == 0:
        return 0.0
    return update_norm / param_norm if param_norm > 0 else math.inf


@dataclass(eq=False)
class ParamReport:
    """One parameter tensor: its effective-lr distribution and update/param norms.

    In a distributed run reported rank by rank, ``replica`` marks a copy of elements that
    another rank counts (a DDP replica, HSDP's replicated dimension): ``lrscope merge``
    leaves it out, so that no element is counted twice.
    """

    name: str
    shape: tuple[int, ...]
    effective_lr: Distribution | None = None
    update_magnitude: Distribution | None = None
    update_norm: float | None = None
    param_norm: float | None = None
    replica: bool = False

    @property
    def update_to_param(self) -> float | None:
        """||delta theta|| / ||theta||, the update:data ratio."""
        return _ratio(self.update_norm, self.param_norm)

    def metrics(self) -> dict[str, float]:
        """Flat metrics of this tensor (distribution summaries and norms)."""
        out: dict[str, float] = {}
        for label in ("effective_lr", "update_magnitude"):
            dist = getattr(self, label)
            if dist is not None:
                for key, value in dist.summary().items():
                    # eps_dominated is a headline metric, the rest belong to the distribution.
                    out[key if key == "eps_dominated" else f"{label}/{key}"] = value
        for label in ("update_norm", "param_norm", "update_to_param"):
            value = getattr(self, label)
            if value is not None:
                out[label] = float(value)
        return out


@dataclass(eq=False)
class GroupReport(ParamReport):
    """One parameter group: the lr the step used, step size, decay and merged distributions.

    ``extra`` holds family-specific scalars (e.g. NAdam's ``step_size_grad``).

    Unknown is NaN, never a guess (SPEC §6): ``lr``, ``step_size`` and ``weight_decay_rate``
    default to NaN, and only what lrscope reads or models sets them (an optimizer it does not
    model has no step size or decay rate).  ``lr_source`` says what ``lr`` is: ``"lr"``, the
    optimizer's own learning-rate hyperparameter at this step (a torch group's ``lr`` key,
    Keras' and Optax's ``learning_rate``), or the applied value an optimizer publishes
    instead (``"scheduled_lr"``, ``"d*lr"``; the report's notes say how it was read).
    """

    name: str = "pg0"
    shape: tuple[int, ...] = ()
    lr: float = math.nan
    step_size: float = math.nan
    weight_decay_rate: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)
    params: dict[str, ParamReport] = field(default_factory=dict)
    lr_source: str = "lr"

    def metrics(self) -> dict[str, float]:
        """The group's scalars, then its distribution summaries and norms.

        A NaN scalar (``lr``, ``step_size``, ``weight_decay_rate``, an ``extra``) is left out:
        there NaN means unknown, and logs carry no value for it (a hyperparameter that is
        NaN itself reads the same; its NaN updates show in the distributions).  Distribution
        summaries and norms are measurements and keep NaN and inf as measured: an all-NaN
        distribution's mean, the infinite update ratio of a zero tensor that moved.

        >>> GroupReport(name="pg0", lr=0.02).metrics()
        {'lr': 0.02}
        """
        scalars = {"lr": self.lr, "step_size": self.step_size,
                   "weight_decay_rate": self.weight_decay_rate, **self.extra}
        out = {k: float(v) for k, v in scalars.items() if not math.isnan(float(v))}
        out.update(super().metrics())
        return out

    @classmethod
    def combine(cls, params: dict[str, ParamReport], **scalars: Any) -> GroupReport:
        """A group report whose distributions and norms merge those of ``params``."""
        group = cls(params=params, **scalars)
        for label in ("effective_lr", "update_magnitude"):
            dists = [getattr(p, label) for p in params.values() if getattr(p, label) is not None]
            if dists:
                setattr(group, label, Distribution.union(dists))
        for label in ("update_norm", "param_norm"):
            norms = [getattr(p, label) for p in params.values()]
            if norms and all(n is not None for n in norms):
                setattr(group, label, math.sqrt(sum(n * n for n in norms)))
        return group


def tag_prefix(optimizer: str, name: str | None = None) -> str:
    """Lightning's ``LearningRateMonitor`` naming: ``lr-<OptimizerClass>``, or ``lr-<name>``
    for a monitor given a name (``StepReport.optimizer`` and ``.name``, or a JSONL record's).

    >>> tag_prefix("AdamW"), tag_prefix("AdamW", "generator")
    ('lr-AdamW', 'lr-generator')
    """
    return f"lr-{name or optimizer}"


@dataclass(eq=False)
class StepReport:
    """Everything lrscope knows about the step just taken.

    ``skipped`` is true when the optimizer did not update (e.g. GradScaler found
    inf gradients); ``notes`` says in words what could not be determined.
    """

    t: int
    optimizer: str
    framework: str
    family: str | None
    groups: list[GroupReport]
    skipped: bool = False
    empirical: bool = False
    notes: list[str] = field(default_factory=list)
    #: The name given to ``lrscope.watch(..., name=)``, to tell apart two optimizers of one
    #: class (a GAN's generator and discriminator); None: the class name stands for it.
    name: str | None = None
    #: Findings (``lrscope.findings.Finding``) that first held at this step, set by a monitor
    #: watching with ``findings=True``; the sinks write them.
    findings: list[Any] = field(default_factory=list)

    @property
    def default_prefix(self) -> str:
        """The tags' prefix (``tag_prefix``)."""
        return tag_prefix(self.optimizer, self.name)

    def scalars(self, prefix: str | None = None, params: bool = False) -> dict[str, float]:
        """Flat ``{"<prefix>/<group>/<metric>": float}``; per-tensor metrics with ``params``.

        What every sink logs: an unknown (NaN) group scalar has no entry
        (``GroupReport.metrics``)."""
        prefix = self.default_prefix if prefix is None else prefix
        out: dict[str, float] = {}
        for group in self.groups:
            for key, value in group.metrics().items():
                out[f"{prefix}/{group.name}/{key}"] = value
            if params:
                for name, param in group.params.items():
                    for key, value in param.metrics().items():
                        out[f"{prefix}/{group.name}/{name}/{key}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested form, including the sketches (mergeable later), and
        ``findings`` when some first held at this step."""

        def dist(d: Distribution | None) -> dict[str, Any] | None:
            return None if d is None else d.to_dict()

        def param(p: ParamReport) -> dict[str, Any]:
            out = {"shape": list(p.shape), "effective_lr": dist(p.effective_lr),
                   "update_magnitude": dist(p.update_magnitude), "update_norm": p.update_norm,
                   "param_norm": p.param_norm, "update_to_param": p.update_to_param}
            return {**out, "replica": True} if p.replica else out

        return {
            "t": self.t, "name": self.name, "optimizer": self.optimizer, "framework": self.framework,
            "family": self.family, "skipped": self.skipped, "empirical": self.empirical,
            "notes": list(self.notes),
            "groups": [
                {"name": g.name, "lr": g.lr, "lr_source": g.lr_source, "step_size": g.step_size,
                 "weight_decay_rate": g.weight_decay_rate, "extra": dict(g.extra),
                 **param(g), "params": {n: param(p) for n, p in g.params.items()}}
                for g in self.groups
            ],
            **({"findings": [f.to_dict() for f in self.findings]} if self.findings else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        """The StepReport that ``to_dict`` wrote (a JSONL record), sketches included where the
        record kept them; a distribution without its sketch cannot be rebuilt (ValueError).

        >>> import numpy as np
        >>> group = GroupReport(name="pg0", lr=1e-3, step_size=3e-4,
        ...                     effective_lr=Distribution.from_array(np.array([1e-4, 2e-4])))
        >>> report = StepReport(t=3, optimizer="Adam", framework="torch", family="adam", groups=[group])
        >>> back = StepReport.from_dict(report.to_dict())
        >>> back.t, back.groups[0].step_size, back.groups[0].effective_lr.max
        (3, 0.0003, 0.0002)
        """

        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        def dist(entry: dict[str, Any] | None) -> Distribution | None:
            if entry is None:
                return None
            if "sketch" not in entry:
                raise ValueError("this record keeps a distribution's summary without its sketch "
                                 "(JsonlSink(tensor_sketches=False)); it cannot be merged")
            return Distribution.from_dict(entry)

        def param(name: str, entry: dict[str, Any], kind: type = ParamReport, **more: Any) -> Any:
            return kind(name=name, shape=tuple(entry.get("shape") or ()),
                        effective_lr=dist(entry.get("effective_lr")),
                        update_magnitude=dist(entry.get("update_magnitude")),
                        update_norm=entry.get("update_norm"), param_norm=entry.get("param_norm"),
                        replica=bool(entry.get("replica", False)), **more)

        groups = [param(g["name"], g, GroupReport, lr=number(g.get("lr")),
                        step_size=number(g.get("step_size")),
                        weight_decay_rate=number(g.get("weight_decay_rate")),
                        extra={k: number(v) for k, v in (g.get("extra") or {}).items()},
                        lr_source=g.get("lr_source", "lr"),
                        params={n: param(n, e) for n, e in (g.get("params") or {}).items()})
                  for g in data["groups"]]
        return cls(t=int(data["t"]), optimizer=data.get("optimizer", ""), framework=data.get("framework", ""),
                   family=data.get("family"), groups=groups, skipped=bool(data.get("skipped")),
                   empirical=bool(data.get("empirical")), notes=list(data.get("notes") or []),
                   name=data.get("name"))
