"""An append-only text file that notices a full disk or a deleted log directory."""

from __future__ import annotations

import os
from pathlib import Path


class AppendFile:
    """Appends whole lines and flushes them at once, so a killed process leaves complete lines.

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
        self._handle = open(self.path, "a", encoding="utf-8", newline="")

    @property
    def empty(self) -> bool:
        return self._handle.tell() == 0

    def write(self, text: str) -> None:
        try:
            if os.fstat(self._handle.fileno()).st_nlink == 0:
                raise FileNotFoundError(f"{self.path} was deleted while lrscope was writing to it")
            self._handle.write(text)
            self._handle.flush()
        except OSError:
            self.close()  # the sink is disabled after this: release the file now
            raise

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # the data that could not be flushed was already reported by write

