"""Atomic file writes: a failed or interrupted write never leaves a truncated output.

Every file tl_sinks writes (the HTML report, ``--json``, saved views, training logs and
checkpoints, the default model's card) goes through :func:`atomic_write`: the data is written to
a temporary file in the destination's directory, flushed to disk, then moved over the
destination with :func:`os.replace` (atomic on POSIX and Windows within one file system). Until
that moment the previous file, if any, is untouched; on any failure the temporary file is
removed.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _temp_path(dest: Path) -> Path:
    # Hidden, unique and in the same directory, so os.replace never crosses file systems.
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically through ``write(file_object)``.

    Args:
        path: Destination. A symlink is followed (its target is replaced), as ``open`` would.
        write: Called once with a binary file object open on the temporary file.

    Returns:
        The destination path.

    Raises:
        Whatever ``write`` or the file system raises; the destination is then unchanged and no
        temporary file is left behind.
    """
    dest = Path(os.path.realpath(os.fspath(path)))
    tmp = _temp_path(dest)
    # 0o666 minus the umask, like open(); an existing file keeps its permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if dest.exists():
                os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`).

    The text is encoded before the temporary file is created, so an encoding error leaves no trace.
    """
    return atomic_write_bytes(path, text.encode(encoding))
