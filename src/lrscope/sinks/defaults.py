"""The sinks ``lrscope.watch(..., log_dir=D)`` writes to: TensorBoard and JSONL in D.

A directory that cannot be created or written costs one warning, never an exception:
training goes on, and the sinks that could start keep working (a file that cannot be
opened, such as a FIFO named ``lrscope.jsonl``, costs its sink's own warning).  Without
tensorboardX installed, only the JSONL log is written (one warning says how to get
TensorBoard).

>>> import tempfile
>>> sinks = default_sinks(tempfile.mkdtemp())
>>> [type(s).__name__ for s in sinks]
['TensorBoardSink', 'JsonlSink']
>>> for s in sinks: s.close()
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from lrscope._warnings import warn
from lrscope.sinks import Sink
from lrscope.sinks.jsonl import FILE_NAME as JSONL_FILE_NAME
from lrscope.sinks.jsonl import JsonlSink
from lrscope.sinks.tensorboard import TensorBoardSink


def default_sinks(log_dir: str | os.PathLike) -> list[Sink]:
    """TensorBoard event files and ``lrscope.jsonl`` in ``log_dir``; failures become warnings."""
    directory = Path(log_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable (a read-only disk, or permissions)")
    except OSError as error:
        warn(f"lrscope: cannot log to {os.fspath(log_dir)!r} ({type(error).__name__}: {error}); "
             "training continues without logs there: give log_dir= a writable directory.")
        return []
    makers: list[tuple[str, Callable[[], Sink]]] = [
        ("TensorBoard event files", lambda: TensorBoardSink(directory)),
        (JSONL_FILE_NAME, lambda: JsonlSink(directory / JSONL_FILE_NAME)),
    ]
    sinks: list[Sink] = []
    failures: list[str] = []
    for what, make in makers:
        try:
            sinks.append(make())
        except ImportError as error:
            failures.append(f"{what}: {error}")
        except OSError as error:
            failures.append(f"{what}: {type(error).__name__}: {error}")
    if failures:
        warn(f"lrscope: cannot log to {os.fspath(log_dir)!r} ({'; '.join(failures)}); "
             "training continues" + (" with the other sinks." if sinks else " without logs there."))
    return sinks
