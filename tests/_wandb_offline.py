"""Read back what W&B wrote offline: the rows (history records) of a run's ``.wandb`` file.

W&B offline writes a transaction log, ``run-<id>.wandb``, that ``wandb sync`` uploads later:
a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB's log format (32 KiB
blocks of records with a CRC-32 of their type and data, a 2-byte length and a type: full,
first, middle, last), each record a ``wandb_internal_pb2.Record``.  The package has no
Python reader any more (its service is written in Go), so the tests read it with this one,
which checks every record's CRC.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert HEADER.unpack(data[:HEADER.size]) == (b":W&B", 0xBEE1, 0), "not a .wandb file"
    position, pending = HEADER.size, b""
    while position + RECORD.size <= len(data):
        left = BLOCK - position % BLOCK
        if left < RECORD.size:
            position += left  # (a block's tail too short for a header is padding)
            continue
        crc, length, kind = RECORD.unpack_from(data, position)
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + RECORD.size:position + RECORD.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at {position}"
        position += RECORD.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows a W&B run logged, in order: ``{key: value}`` with nested keys joined by "."."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                key = ".".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def offline_run_dir(wandb_dir: Path) -> Path:
    """The one offline run directory under ``WANDB_DIR``."""
    (run_dir,) = Path(wandb_dir, "wandb").glob("offline-run-*")
    return run_dir


def metric_definitions(run_dir: Path) -> dict[str, str]:
    """``{name or glob: step_metric}`` of the run's ``define_metric`` calls."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {}
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "metric":
            out[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return out
