"""Append-only log files that keep every line whole, whatever happens to them mid-run.

``AppendFile`` appends lines of text (JSONL, CSV) to a file other processes may append to
too; ``open_append`` opens a file for appending without ever blocking (a FIFO that no
process reads is an error, not a hang); ``opened`` turns a sink's failure to open its file
into one warning, as ``log_dir=`` does, instead of an exception before training.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Callable, TypeVar

from lrscope._warnings import warn

try:
    import fcntl
except ImportError:  # Windows: no locks, no repairs (see AppendFile)
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")
#: Read back this much at a time to find the last complete line of a torn file.
_CHUNK = 1 << 16
#: A torn last line longer than this is ended with a newline rather than cut off: no log
#: line is that long, so the file may not be a log at all.
MAX_CUT = 1 << 26


def describe(sink: Any) -> str:
    """The sink's class and, if it has one, its file or directory, for warnings.

    >>> from lrscope.sinks import JsonlSink
    >>> describe(JsonlSink.__new__(JsonlSink))
    'JsonlSink'
    """
    where = getattr(sink, "path", None) or getattr(sink, "log_dir", None)
    return type(sink).__name__ + (f"({os.fspath(where)})" if where else "")


def opened(sink: Any, open_file: Callable[[], T]) -> T | None:
    """``open_file()``, or None after one warning naming ``sink`` if it raises OSError (a
    read-only disk, a FIFO, a path under a file): the sink is then disabled, and training
    goes on, as with an unusable ``log_dir=``."""
    try:
        return open_file()
    except OSError as error:
        warn(f"lrscope: {describe(sink)} cannot write there ({type(error).__name__}: {error}); it "
             "is disabled and training continues: give it a path on a writable disk.")
        return None


def open_append(path: Path, *, exclusive: bool = False) -> int:
    """A descriptor appending to ``path``, created if missing (its directory must exist),
    open for reading too if it is a regular file (to repair a torn tail).

    Opened without blocking: on a FIFO that no process reads, ``os.open`` would wait for a
    reader forever; here it raises, saying what the file is.  Writes then block as usual.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | nonblocking | getattr(os, "O_BINARY", 0)
             | (os.O_EXCL if exclusive else 0))  # (O_BINARY on Windows: no \r added)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ENXIO and _is_fifo(path):
            raise OSError(errno.ENXIO, f"{path} is a FIFO (named pipe) that no process reads; "
                          "lrscope writes its logs to regular files: remove it, or start "
                          "its reader first") from None
        raise
    if stat.S_ISREG(os.fstat(fd).st_mode):
        # Reopened for reading and writing (O_RDWR on a FIFO would never block, not even
        # without a reader: hence the first open); the same file, unless swapped meanwhile.
        try:
            readable = os.open(path, os.O_RDWR | os.O_APPEND | getattr(os, "O_BINARY", 0))
        finally:
            os.close(fd)
        return readable
    if nonblocking:
        os.set_blocking(fd, True)
    return fd


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not deleted, not replaced)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def write_all(fd: int, data: bytes) -> None:
    """``data`` written whole; a short write (only on errors such as a full disk) goes on
    until the error is raised."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # what could not be written was reported by the write that failed


class AppendFile:
    """Appends whole lines to a text file, which several writers may share.

    * Each ``write`` is one ``write`` system call on a file opened for appending, holding
      an exclusive ``flock`` where the file system offers one: several writers of one file
      (two monitors given one log directory, every rank of a distributed run) never split
      each other's lines, however long, and nothing waits in a buffer for a kill to lose.
    * A torn last line (a writer killed inside a write, a write a full disk cut short) is
      cut off before the next line is appended, so no record gets glued onto a fragment
      (without ``flock``, or for a fragment over ``MAX_CUT`` bytes, a newline ends it
      instead, and readers skip it).  A write that fails takes its own partial line back,
      so it can be retried whole.
    * ``header`` (CSV's column names) is written by whichever writer finds the file empty.
    * A file deleted or replaced while open (its log directory deleted and recreated) is
      reopened at its path, with one warning.  While the directory is missing, ``write``
      raises FileNotFoundError: lrscope never recreates a directory someone deleted.

    The file is opened (and its directory created) by the constructor, which raises
    OSError if that fails.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "sub" / "log.csv"
    >>> log = AppendFile(path, header="a,b\\n")
    >>> log.write("1,2\\n"); log.close()
    >>> path.read_text()
    'a,b\\n1,2\\n'
    """

    def __init__(self, path: str | os.PathLike, *, header: str = ""):
        self.path = Path(path)
        self.header = header.encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = open_append(self.path)
        self._closed = False
        # Locks and repairs need a regular file (not a pipe or a device such as /dev/full).
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._repairs = self._regular and hasattr(os, "pread")
        self._locks = self._repairs and fcntl is not None
        self._headed = False  # (a pipe: the header went into it)

    def write(self, text: str) -> None:
        """Append ``text``, whole lines; raises OSError if it cannot (nothing of it stays)."""
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        if self._fd is None or (self._regular and not same_file(self._fd, self.path)):
            self._reopen()
        assert self._fd is not None
        data = text.encode("utf-8")
        if not self._repairs:  # a pipe or a device (or Windows): no lock, no repair
            headed = self._headed if not self._regular else not self._is_empty()
            write_all(self._fd, data if headed else self.header + data)
            self._headed = True
            return
        locked = self._lock()
        try:
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":  # a torn last line
                complete = _complete_length(self._fd, size) if locked else None
                if complete is not None:
                    os.ftruncate(self._fd, complete)
                    size = complete
                else:
                    data = b"\n" + data
            if size == 0:
                data = self.header + data
            try:
                write_all(self._fd, data)
            except OSError:
                if locked:  # take the partial line back (nobody else wrote meanwhile)
                    try:
                        os.ftruncate(self._fd, size)
                    except OSError:
                        pass  # the next write cuts it
                raise
        finally:
            if locked:
                self._unlock()

    def _is_empty(self) -> bool:
        assert self._fd is not None
        return os.fstat(self._fd).st_size == 0

    def _lock(self) -> bool:
        if self._locks:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                return True
            except OSError:  # a file system without locks (some network mounts)
                self._locks = False
        return False

    def _unlock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass  # released by close at the latest

    def _reopen(self) -> None:
        """Open the file at ``path`` again after it was deleted or replaced."""
        if self._fd is not None:
            close_quietly(self._fd)
            self._fd = None
        try:
            self._fd = open_append(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"the directory of {self.path} was deleted; lrscope writes there "
                "again once it is recreated") from None
        warn(f"lrscope: {self.path} was deleted or replaced while lrscope was writing to it; "
             "lrscope writes on into a new file at that path.")

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            close_quietly(fd)


def _complete_length(fd: int, size: int) -> int | None:
    """The length of the file's complete lines (up to and including its last newline), or
    None if the last ``MAX_CUT`` bytes hold no newline."""
    end, complete = size, 0
    while end > 0 and size - end < MAX_CUT:
        start = max(0, end - _CHUNK)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            complete = start + at + 1
            break
        end = start
    return complete if size - complete <= MAX_CUT else None
