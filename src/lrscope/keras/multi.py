"""``keras.optimizers.MultiOptimizer``: each sub-optimizer is read by its own ``KerasReader``
and each of its groups is a group of the report.

MultiOptimizer routes every variable to one sub-optimizer (an ``OptimizerMap`` or a
callable) and calls each sub-optimizer's own ``apply`` with its variables; each keeps its
own ``iterations``, schedule, state and ``loss_scale_factor`` (the wrapper's).  So a group
is a sub-optimizer (named after it: ``optimizer.name``, unique in Keras unless given
twice, else ``pg<i>``; a Muon's two rules are ``<name>-muon`` and ``<name>-adam``), with
its own lr, step size, decay and distributions, modelled or not as that class is alone.
The report's ``t`` is the wrapper's ``iterations``; a group whose sub-optimizer
accumulates gradients describes its own last step.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from lrscope.formulas import Elementwise
from lrscope.keras.reader import KerasReader, unwrap
from lrscope.report import StepReport

_MULTI = keras.optimizers.MultiOptimizer


def is_multi(optimizer: Any) -> bool:
    """A MultiOptimizer whose ``apply`` is Keras' own (a subclass overriding it is not
    modelled: its dispatch may differ)."""
    return isinstance(optimizer, _MULTI) and type(optimizer).apply is _MULTI.apply


class MultiReader:
    """Turns a MultiOptimizer's sub-optimizers into one StepReport, a group per rule."""

    def __init__(self, optimizer: Any, empirical: bool = False):
        self.optimizer = optimizer
        self.empirical = empirical
        self._readers: dict[int, KerasReader] = {}
        self.unsupported = [u for r in self.readers() for u in r.unsupported]

    def readers(self) -> list[KerasReader]:
        """One reader per sub-optimizer, in the wrapper's order (a callable map adds its
        optimizers when the wrapper is built)."""
        for opt in self.optimizer.optimizers:
            if id(opt) not in self._readers:
                self._readers[id(opt)] = KerasReader(opt, empirical=self.empirical)
        return [self._readers[id(opt)] for opt in self.optimizer.optimizers]

    @property
    def notes(self) -> list[str]:
        return [f"{name}: {note}" for name, r in zip(self._names(), self.readers()) for note in r.notes]

    @property
    def family(self) -> str | None:
        """The sub-optimizers' family where they share one, else None."""
        families = {r.family for r in self.readers()}
        return families.pop() if len(families) == 1 else None

    @property
    def measured(self) -> bool:
        return any(r.measured for r in self.readers())

    @property
    def accumulation_steps(self) -> int | None:
        return None  # MultiOptimizer takes no gradient_accumulation_steps

    def history(self) -> tuple[str, str] | None:
        """The first sub-optimizer's need that skips most (see ``KerasReader.history``)."""
        needs = [h for h in (r.history() for r in self.readers()) if h is not None]
        needs.sort(key=lambda need: need[1] != "distributions skipped")
        return needs[0] if needs else None

    def position(self) -> tuple[int, int, bool]:
        raw = int(ops.convert_to_numpy(self.optimizer._iterations))
        return raw, raw, raw > 0

    def _names(self) -> list[str]:
        names = [r.optimizer.name for r in self.readers()]
        return [n if names.count(n) == 1 else f"pg{i}" for i, n in enumerate(names)]

    def _route(self, variables: Sequence[Any]) -> list[list[Any]]:
        """``variables`` split by sub-optimizer, as the wrapper routes them (by its table once
        built, else by its map, as its ``build`` will)."""
        opt, readers = self.optimizer, self.readers()
        split: list[list[Any]] = [[] for _ in readers]
        for v in variables:
            if opt.built:
                i = opt._var_to_optimizer_idx[opt._var_key(v)]
            else:
                target = opt._optimizer_map(v)
                i = next((j for j, r in enumerate(readers) if r.optimizer is target), None)
                if i is None:  # an optimizer the map creates: known once built
                    continue
            split[i].append(v)
        return split

    def _pairs(self, grads: Sequence[Any] | None,
               variables: Sequence[Any] | None) -> list[tuple[list[Any] | None, list[Any] | None]]:
        """``(grads, variables)`` of each sub-optimizer (None, None where no grads are given)."""
        if grads is None:
            return [(None, None)] * len(self.readers())
        variables = list(self.optimizer._trainable_variables if variables is None else variables)
        by_key = {self.optimizer._var_key(v): g for g, v in zip(grads, variables)}
        return [([by_key[self.optimizer._var_key(v)] for v in vs], vs) for vs in self._route(variables)]

    def record_before(self, variables: Sequence[Any] | None = None) -> dict[int, dict[int, dict[str, Any]]]:
        """Each sub-optimizer's ``record_before``, by its position."""
        readers = self.readers()
        split = self._route(variables) if variables is not None else [None] * len(readers)
        return {i: r.record_before(vs) for i, (r, vs) in enumerate(zip(readers, split))
                if r.history() is not None}

    def report(
        self,
        *,
        distributions: bool = True,
        grads: Sequence[Any] | None = None,
        variables: Sequence[Any] | None = None,
        recorded: dict[int, dict[int, dict[str, Any]]] | None = None,
    ) -> StepReport:
        """StepReport of the wrapper's last step: the groups of every sub-optimizer."""
        _, t, _ = self.position()
        groups, notes, measured = [], [], False
        pairs = self._pairs(grads, variables)
        for i, (name, reader, (sub_grads, sub_vars)) in enumerate(zip(self._names(), self.readers(), pairs)):
            if not reader.variables():
                continue
            report = reader.report(distributions=distributions, grads=sub_grads, variables=sub_vars,
                                   recorded=(recorded or {}).get(i))
            for group in report.groups:
                group.name = name if len(report.groups) == 1 else f"{name}-{group.name}"
                groups.append(group)
            notes += [f"{name}: {note}" for note in report.notes]
            measured = measured or report.empirical
        if not t:
            notes.append("no optimizer step has been taken yet (t = 0): inspect after optimizer.apply()")
        return StepReport(t=t, optimizer=type(self.optimizer).__name__, framework="keras", family=self.family,
                          groups=groups, empirical=measured, notes=notes)

    def each_elementwise(
        self,
        grads: Sequence[Any] | None = None,
        variables: Sequence[Any] | None = None,
        recorded: dict[int, dict[int, dict[str, Any]]] | None = None,
    ) -> list[tuple[str, Elementwise]]:
        """``(variable path, Elementwise)`` of every variable of the last step."""
        out = []
        for i, (reader, (sub_grads, sub_vars)) in enumerate(zip(self.readers(), self._pairs(grads, variables))):
            if reader.variables():
                out += reader.each_elementwise(sub_grads, sub_vars, (recorded or {}).get(i))
        return out


def reader_for(optimizer: Any, empirical: bool = False) -> KerasReader | MultiReader:
    """The reader of a Keras optimizer: a MultiReader for MultiOptimizer, else a KerasReader."""
    inner = unwrap(optimizer)
    return MultiReader(inner, empirical) if is_multi(inner) else KerasReader(optimizer, empirical)
