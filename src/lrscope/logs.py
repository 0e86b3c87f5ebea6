"""Reading lrscope's logs: the JSONL file the JSONL sink writes.

>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "lrscope.jsonl"
>>> _ = path.write_text('{"t": 1, "optimizer": "Adam", "groups": []}\\n{"t": 2, "gro')
>>> [record["t"] for record in read_jsonl(path)]
[1]
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of an lrscope JSONL file; an incomplete or corrupt line is skipped."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "t" in record and "groups" in record:
                yield record
