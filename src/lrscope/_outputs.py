"""The files the command line writes (figures, CSV): only where asked, never through a link.

A file is written to a new temporary file beside it, then renamed over the target: the
rename replaces the directory entry, so even a symbolic link put there meanwhile is
replaced, never written through.  A target that already is a symbolic link is refused
(exit code 2): a log directory from somewhere else could hold ``lrscope.png`` pointing
anywhere.  A failed write leaves no temporary file.

>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> target = output_path(folder, default=folder / "x.png", suffix=".png", in_directory="lrscope.png")
>>> target.name
'lrscope.png'
>>> write_replacing(target, lambda handle: handle.write(b"data"))
>>> [p.name for p in folder.iterdir()], target.read_bytes()
(['lrscope.png'], b'data')
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable


def output_path(given: str | os.PathLike | None, *, default: Path, suffix: str | None = None,
                in_directory: str | None = None) -> Path:
    """The file to write: ``given``, else ``default``.  ``given`` naming a directory means
    ``given/in_directory`` (refused where ``in_directory`` is None); a name ending in another
    suffix than ``suffix`` (another format) is refused.  ValueError in one line, naming it."""
    path = Path(given) if given is not None else default
    if path.is_dir():  # a link to a directory included: the user named it
        if in_directory is None:
            raise ValueError(f"{path} is a directory; name a file")
        path = path / in_directory
    if suffix is not None and path.suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{path} names a {path.suffix} file, but this writes {suffix[1:].upper()} "
                         f"(name it {path.with_suffix(suffix).name}, or leave the suffix out)")
    _check_target(path)
    return path


def _check_target(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    if stat.S_ISLNK(mode):
        raise ValueError(f"{path} is a symbolic link; lrscope writes no file through a link "
                         "(remove it, or name another file)")
    if not stat.S_ISREG(mode):
        raise ValueError(f"cannot write {path}: it exists and is not a regular file")


def write_replacing(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` with a binary file, then put that file at ``path`` (see the module
    docstring).  ValueError in one line when ``path`` cannot be written."""
    path = Path(path)
    _check_target(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        handle = os.fdopen(os.open(temporary, flags, 0o666), "wb")
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with handle:
            write(handle)
        _check_target(path)
        os.replace(temporary, path)
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
