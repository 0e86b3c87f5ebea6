"""An append-only text file that notices a full disk or a deleted log directory."""

from __future__ import annotations

import os
from pathlib import Path


class AppendFile:
    """Appends whole lines, each in one ``write`` system call on a file opened for appending.

    A killed process leaves complete lines (nothing waits in a buffer), and several writers
    of one file (two monitors given the same log directory, or every rank of a distributed
    run) never split each other's lines, however long: the kernel appends each call whole.

    ``write`` raises OSError when the disk is full or when the file (or its directory)
    was deleted while open: writing on would silently go nowhere.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "sub" / "log.txt"
    >>> log = AppendFile(path)
    >>> log.write("a\\n"); log.close()
    >>> path.read_text()
    'a\\n'
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)  # (Windows: no \r)
        self._fd: int | None = os.open(self.path, flags, 0o666)

    @property
    def empty(self) -> bool:
        return self._fd is not None and os.fstat(self._fd).st_size == 0

    def write(self, text: str) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        try:
            if os.fstat(self._fd).st_nlink == 0:
                raise FileNotFoundError(f"{self.path} was deleted while lrscope was writing to it")
            data = memoryview(text.encode("utf-8"))
            while data:  # a short write happens only on an error such as a full disk
                data = data[os.write(self._fd, data):]
        except OSError:
            self.close()  # the sink is disabled after this: release the file now
            raise

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # what could not be written was already reported by write
