"""lrscope: the learning rate your optimizer really applies.

``import lrscope`` imports no framework; framework entry points live in
``lrscope.torch``, ``lrscope.keras``, ``lrscope.tf1`` and ``lrscope.optax``.

>>> import lrscope
>>> round(lrscope.step_size("adam", 1, lr=1e-3), 7)
0.0003162
>>> lrscope.step_size_curve("adam", 3, lr=1e-3).round(6).tolist()
[0.000316, 0.000236, 0.000202]
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from lrscope._dispatch import backend_for
from lrscope.curve import step_size_curve
from lrscope.formulas import step_size
from lrscope.monitor import Monitor
from lrscope.registry import register
from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
from lrscope.sinks import Sink

__version__ = "0.1.0"


def inspect(optimizer: Any, **options: Any) -> StepReport:
    """StepReport for the step just taken, read from the optimizer's current state.

    Framework options pass through (``model=`` for parameter names, ``session=`` for
    TF1 graph mode).  Without the hooks of ``watch``, what the state no longer holds
    (the lr after a scheduler stepped, Adadelta's previous accumulator) is named in
    ``report.notes`` instead of guessed.
    """
    return backend_for(optimizer).inspect(optimizer, **options)


def watch(
    optimizer: Any,
    *,
    every: int = 1,
    log_dir: str | os.PathLike | None = None,
    sinks: Iterable[Sink] | None = None,
    **options: Any,
) -> Monitor:
    """Attach a Monitor reporting every step (distributions every ``every`` steps).

    ``log_dir`` writes TensorBoard event files and JSONL there; ``sinks=[...]`` adds sinks
    of your own (the only ones without ``log_dir``).  ``mon.last`` is the latest StepReport;
    ``mon.close()`` detaches.

    ``empirical=True`` (torch, Keras): for an optimizer lrscope does not model (in Keras also
    one with an option it does not model), the realized update (``update_magnitude``, the
    |delta theta| distribution, with ``update_norm`` and ``update_to_param``) is measured
    from a copy of the parameters taken before each step with distributions: one copy of the
    parameters on those steps.  Off here; the training-loop callbacks turn it on.

    ``findings=True`` (the default, every framework): each report is checked by the rules of
    ``lrscope.findings`` (eps domination, tensors without gradients, NaN, update ratios, lr
    schedule surprises, weight decay...); a rule that starts to hold raises one warning and
    is written to the sinks; ``mon.findings`` lists them.  ``findings=False`` turns it off.
    """
    return backend_for(optimizer).watch(optimizer, every=every, log_dir=log_dir, sinks=sinks,
                                        **options)


__all__ = [
    "Distribution", "GroupReport", "Monitor", "ParamReport", "Sink", "StepReport",
    "inspect", "register", "step_size", "step_size_curve", "watch", "__version__",
]
