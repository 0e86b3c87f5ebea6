"""Reading lrscope's logs: the JSONL file the JSONL sink writes, and TensorBoard event files.

Logs come from runs that were killed mid-write, from several processes writing one
directory, or from places nobody checked, so nothing in them makes reading fail: a JSONL
line that is not one well-typed record (not UTF-8, not JSON, nested past Python's recursion
limit, a ``t`` that is not a whole number >= 0, a scalar that is not a finite number or
null, a container of the wrong type, a required key missing) is skipped and counted, and
the reader's ``note()`` says so once.  Unknown keys are ignored.  Only regular files are
opened (a symlink to one included): never a directory, FIFO, socket or device, and a
symlink loop is an error like a missing file.  Everything streams: a record at a time,
an event at a time.

>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "lrscope.jsonl"
>>> _ = path.write_text('{"t": 1, "optimizer": "Adam", "groups": []}\\n{"t": -1}\\n'
...                     '{"t": 2, "optimizer": "Adam", "groups": [{"name": "pg0", "lr": 0.1}]}\\n'
...                     '{"t": 3, "gro')
>>> log = JsonlLog(path)
>>> [record["t"] for record in log]
[1, 2]
>>> log.note().replace(str(path), "PATH")   # the torn last line is no malformed line
'skipped 1 malformed line in PATH (line 2)'
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import sys
import types
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

#: A JSONL line longer than this is skipped without being held in memory.  A record of the
#: benchmark's 82-tensor model with every tensor's sketch is about 316 KB.
MAX_LINE_BYTES = 64 << 20
#: The largest step counter kept (int64, as every framework's).
MAX_T = 2**63 - 1

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def log_location(log_dir: str | os.PathLike) -> tuple[Path, bool]:
    """``log_dir`` as a Path, and whether it is a directory (else a log file); ValueError, in one
    line, when it does not exist or cannot be read."""
    path = Path(log_dir)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as error:
        if not os.path.lexists(path):
            raise ValueError(f"{path} does not exist") from None
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    return path, is_dir


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """``path`` opened for reading in binary mode, if it is a regular file (or a symlink to
    one); ValueError in one line otherwise.  A FIFO is never opened for a blocking read and
    a device never opened at all; ``fstat`` of the open file checks it again.

    >>> open_regular("/")
    Traceback (most recent call last):
    ...
    ValueError: / is not a regular file but a directory
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
    except OSError as error:
        raise ValueError(f"cannot read {os.fspath(path)}: {error.strerror or error}") from None
    kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
    raise ValueError(f"{os.fspath(path)} is not a regular file but {kind}")


def _lines(handle: IO[bytes], stop: int | None = None, offset: int = 0) -> Iterator[bytes | None]:
    """The lines of ``handle`` (with their newline) that start before byte ``stop``, the
    handle at byte ``offset``; None for one over MAX_LINE_BYTES, whose bytes are read past
    in pieces and never held."""
    readline = handle.readline
    while stop is None or offset < stop:
        line = readline(MAX_LINE_BYTES)
        if not line:
            return
        offset += len(line)
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                offset += len(rest)
            offset += len(rest)
            yield None
        else:
            yield line


# -- record validation ---------------------------------------------------------------------

def _numbers(values: Iterable[Any]) -> bool:
    """Whether every value is a finite number (not a bool) or None: the only scalars lrscope
    writes (JSON's NaN, Infinity and 1e400 are not)."""
    for value in values:
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # inf or NaN
                return False
        elif value is not None and (kind is not int or not -MAX_T <= value <= MAX_T):
            return False
    return True


def _summary(value: Any, sketches: bool) -> bool:
    """A distribution's summary (count, min, max, quantiles, ...) and, where read, its sketch."""
    if value is None:
        return True
    if type(value) is not dict:
        return False
    sketch = value.get("sketch")
    if sketch is None:
        return _numbers(value.values())
    return (_numbers(item for key, item in value.items() if key != "sketch")
            and (not sketches or _sketch(sketch)))


def _sketch(value: Any) -> bool:
    """What ``LogSketch.from_dict`` reads: numbers, and per sign int64 keys and counts."""
    if type(value) is not dict or "positive" not in value or "negative" not in value:
        return False
    for key, item in value.items():
        if key in ("positive", "negative"):
            if type(item) is not dict:
                return False
            keys, counts = item.get("keys"), item.get("counts")
            if type(keys) is not list or type(counts) is not list or len(keys) != len(counts):
                return False
            if not all(type(k) is int and -MAX_T <= k <= MAX_T for k in keys + counts):
                return False
        elif not _numbers((item,)):
            return False
    return True


def _tensor(entry: Any, sketches: bool) -> bool:
    """A tensor's entry (also the group's own distributions and norms)."""
    if type(entry) is not dict:
        return False
    get = entry.get
    return (_numbers((get("update_to_param"), get("update_norm"), get("param_norm")))
            and _summary(get("effective_lr"), sketches)
            and _summary(get("update_magnitude"), sketches))


def _group(group: Any, sketches: bool) -> bool:
    if type(group) is not dict:
        return False
    get = group.get
    if not (type(get("name")) is str and _numbers((get("lr"), get("step_size"), get("weight_decay_rate")))
            and _tensor(group, sketches)):
        return False
    extra, params = get("extra"), get("params")
    if extra is not None and (type(extra) is not dict or (extra and not _numbers(extra.values()))):
        return False
    if params is None or params == {}:
        return True
    return type(params) is dict and all(_tensor(p, sketches) for p in params.values())


def valid_record(record: Any, sketches: bool = True) -> bool:
    """Whether ``record`` is one step as lrscope writes it: ``t`` a whole number in
    [0, 2**63), ``optimizer`` a string, ``name`` a string or null, ``groups`` a list of
    groups with a string ``name``, every scalar a finite number or null, ``extra`` and
    ``params`` objects, distributions objects of numbers (and sketches where ``sketches``).

    >>> valid_record({"t": 3, "optimizer": "Adam", "groups": [{"name": "pg0", "lr": 1e-3}]})
    True
    >>> valid_record({"t": 3.0, "optimizer": "Adam", "groups": []})
    False
    """
    if type(record) is not dict:
        return False
    get = record.get
    t, name, skipped, groups = get("t"), get("name"), get("skipped"), get("groups")
    if not (type(t) is int and 0 <= t <= MAX_T and type(get("optimizer")) is str
            and (name is None or type(name) is str) and (skipped is None or type(skipped) is bool)
            and type(groups) is list):
        return False
    for group in groups:
        if not _group(group, sketches):
            return False
    return True


# -- JSONL ---------------------------------------------------------------------------------

_SKETCH, _SKETCH_END = ',"sketch":{', "}}"


def _without_sketches(text: str | bytes) -> str | bytes:
    """``text`` (or its bytes) without its ``"sketch"`` objects, cut where the JSONL sink
    writes them (the last key of a distribution, two flat objects inside): most of a
    record's bytes, which a reader of the summaries would parse for nothing.  Text of
    another layout may come out invalid; the caller then parses the whole line.

    >>> _without_sketches(b'{"min":1,"sketch":{"positive":{"keys":[3]}},"max":2}')
    b'{"min":1,"max":2}'
    """
    marker, end_marker = _SKETCH, _SKETCH_END
    if isinstance(text, bytes):
        marker, end_marker = marker.encode(), end_marker.encode()
    start = text.find(marker)
    if start < 0:
        return text
    pieces, done = [], 0
    while start >= 0:
        end = text.find(end_marker, start)
        if end < 0:
            return text
        pieces.append(text[done:start])
        done = end + 2
        start = text.find(marker, done)
    pieces.append(text[done:])
    return text[:0].join(pieces)


_decode = json.JSONDecoder().raw_decode
try:  # the plot extra's fast JSON parser; json alone reads the same records
    from orjson import loads as _fast_loads
except ImportError:
    _fast_loads = None


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: What ``JsonlLog._record`` returns for a torn last line.
_TORN = object()


def _parse(text: str) -> Any:
    """The JSON value of ``text`` (one line, its newline included), or None.  Past Python's
    recursion limit (a value nested thousands deep) the line is invalid like any other."""
    try:
        value, end = _decode(text)
    except (ValueError, RecursionError):
        try:
            return json.loads(text)  # leading whitespace, or invalid after all
        except (ValueError, RecursionError):
            return None
    return value if end == len(text) or text[end:].isspace() else None


class JsonlLog:
    """The records of one lrscope JSONL file, one at a time, each checked by
    ``valid_record``; a line that fails is skipped and counted in ``malformed``.  A last line
    without its newline that does not parse is a write in progress (or a process killed
    mid-line) and skipped without counting.  ``sketches=False`` leaves every sketch out of
    the records, unparsed and unchecked: for readers of the summaries (``lrscope plot``),
    several times faster on logs with sketches.

    ``start`` and ``stop`` read the lines that start in that byte range (``start`` at the
    start of a line), for readers that split a long log between processes; ``lines`` counts
    the lines read, and ``first_malformed`` is counted from ``start``.

    Raises ValueError in one line when ``path`` is not a regular file.
    """

    def __init__(self, path: str | os.PathLike, *, sketches: bool = True, start: int = 0,
                 stop: int | None = None):
        self.path = os.fspath(path)
        self.sketches = sketches
        self.start, self.stop = start, stop
        self.lines = self.malformed = 0
        self.first_malformed: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open_regular(self.path) as handle:
            handle.seek(self.start)
            for number, line in enumerate(_lines(handle, self.stop, self.start), start=1):
                self.lines = number
                record = None if line is None else self._record(line)
                if record is _TORN:
                    return  # the last line, torn
                if record is None:
                    self.malformed += 1
                    self.first_malformed = self.first_malformed or number
                    continue
                yield record

    def _record(self, line: bytes) -> Any:
        """The valid record of ``line``, None for a malformed one, or ``_TORN`` for a last
        line without its newline that does not parse.  orjson, where installed, parses the
        bytes (about twice as fast); anything it refuses is parsed again as text by
        ``json``, which decides."""
        sketches = self.sketches
        if _fast_loads is not None and (line.isascii() or _utf8(line)):  # the whole line, sketches too
            cut = line if sketches else _without_sketches(line)
            try:
                record = _fast_loads(cut)
            except ValueError:
                record = None
            if record is not None and valid_record(record, sketches):
                if not sketches and b'"sketch"' in cut:
                    _drop_sketches(record)
                return record
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return None
        cut = text if sketches else _without_sketches(text)
        record = _parse(cut)
        valid = valid_record(record, sketches)
        if not valid and cut is not text:  # not cut where the sink writes
            record, cut = _parse(text), text
            valid = valid_record(record, sketches)
        if not valid:
            return _TORN if record is None and not line.endswith(b"\n") else None
        if not sketches and '"sketch"' in cut:
            _drop_sketches(record)
        return record

    def note(self) -> str | None:
        """One line about the lines skipped, or None."""
        return malformed_note(self.path, self.malformed, self.first_malformed) if self.malformed else None


def malformed_note(path: str | os.PathLike, count: int, first: int | None) -> str:
    """``skipped N malformed lines in PATH (the first: line K)``.

    >>> malformed_note("x.jsonl", 1, 7)
    'skipped 1 malformed line in x.jsonl (line 7)'
    """
    if count == 1:
        return f"skipped 1 malformed line in {os.fspath(path)} (line {first})"
    return f"skipped {count} malformed lines in {os.fspath(path)} (the first: line {first})"


def _drop_sketches(record: dict[str, Any]) -> None:
    """Remove the sketches ``_without_sketches`` did not cut (another layout)."""
    for group in record["groups"]:
        for entry in (group, *(group.get("params") or {}).values()):
            for label in ("effective_lr", "update_magnitude"):
                summary = entry.get(label)
                if summary:
                    summary.pop("sketch", None)


def read_jsonl(path: str | os.PathLike, *, sketches: bool = True) -> Iterator[dict[str, Any]]:
    """The valid records of an lrscope JSONL file (see ``JsonlLog``), malformed lines skipped."""
    yield from JsonlLog(path, sketches=sketches)


# -- TensorBoard event files ---------------------------------------------------------------

def _creation_order(name: str) -> list[tuple[int, int | str]]:
    """A sort key reading the digit runs of an event file's name as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def event_files(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(files, others)``: the paths in ``directory`` whose names contain ``tfevents``, in
    the order their writers created them (the names start with the creation time, and
    lrscope's end in a per-process counter: numbers compare as numbers), split into regular
    files and the rest (directories, FIFOs, symlink loops, dangling links).  ValueError in
    one line when ``directory`` cannot be listed.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for n in (9, 10):
    ...     open(os.path.join(folder, f"events.out.tfevents.1.host.lrscope.7.{n}"), "w").close()
    >>> os.mkdir(os.path.join(folder, "events.out.tfevents.2.host"))
    >>> [[os.path.basename(p) for p in found] for found in event_files(folder)]
    [['events.out.tfevents.1.host.lrscope.7.9', 'events.out.tfevents.1.host.lrscope.7.10'], ['events.out.tfevents.2.host']]
    """
    files, others = [], []
    try:
        names = sorted(os.listdir(directory), key=_creation_order)
    except OSError as error:
        raise ValueError(f"cannot read {os.fspath(directory)}: {error.strerror or error}") from None
    for name in names:
        if "tfevents" in name and not name.startswith("."):
            path = os.path.join(directory, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False
            (files if regular else others).append(path)
    return files, others


def _event_proto() -> Any:
    """TensorBoard's Event message class, imported without TensorFlow."""
    from lrscope._optional import require

    require("tensorboard", "tensorboard")
    if "tensorflow" not in sys.modules:
        # TensorBoard would import all of TensorFlow (seconds, and log noise) just to read
        # records; this marker module is how TensorBoard's own no-TF build selects its stub.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.compat.proto.event_pb2 import Event

    return Event


def _masked_crc(data: bytes) -> int | None:
    """TFRecord's masked CRC-32C of ``data``, or None without the crc32c package."""
    try:
        import crc32c
    except ImportError:
        return None
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFile:
    """The scalars of one TensorBoard event file: ``(tag, step, value)`` with ``simple_value``,
    event by event, read from the TFRecord framing directly (length, CRC, Event proto).

    A record cut short at the end of the file (a writer still running or killed) ends it
    quietly; anything else unreadable (a bad checksum, a length past the end of the file on
    the first record, bytes that are not an Event) ends it with ``problem`` set.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.problem: str | None = None

    def __iter__(self) -> Iterator[tuple[str, int, float]]:
        event_class = _event_proto()
        with open_regular(self.path) as handle:
            size = os.fstat(handle.fileno()).st_size
            offset, records = 0, 0
            while True:
                header = handle.read(12)
                if len(header) < 12:
                    return
                length, length_crc = struct.unpack("<QI", header)
                expected = _masked_crc(header[:8])
                if expected is not None and expected != length_crc:
                    self.problem = f"bad record checksum at byte {offset}"
                    return
                if offset + 16 + length > size:
                    if records == 0:
                        self.problem = f"a record at byte {offset} is longer than the file"
                    return
                data = handle.read(length)
                footer = handle.read(4)
                if len(data) < length or len(footer) < 4:
                    return
                expected = _masked_crc(data)
                if expected is not None and expected != struct.unpack("<I", footer)[0]:
                    self.problem = f"bad record checksum at byte {offset}"
                    return
                try:
                    event = event_class.FromString(data)
                except Exception:  # noqa: BLE001 - protobuf's DecodeError, whatever its module
                    self.problem = f"not an event at byte {offset}"
                    return
                offset += 16 + length
                records += 1
                if event.HasField("summary"):
                    step = event.step
                    for value in event.summary.value:
                        if value.HasField("simple_value"):
                            yield value.tag, step, value.simple_value

    def note(self) -> str | None:
        """One line about where reading stopped, or None."""
        return None if self.problem is None else f"read {self.path} up to {self.problem}"
