"""Writing files so that a kill never leaves a part of one under its name."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cxrembed.errors import CxrembedError, DiskFullError

#: OS error numbers of a write refused for want of space (disk, quota, file size limit).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# Libraries that report a failed write in their own exception (h5py's RuntimeError,
# safetensors' SafetensorError, faiss's RuntimeError) keep the OS reason in the text.
_DISK_FULL_TEXT = ("No space left", "File too large", "Disk quota", "errno = 28",
                   "errno = 27", "errno = 122", "os error 28", "os error 27", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space (or the file size limit)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return not isinstance(exc, CxrembedError) and any(t in str(exc) for t in _DISK_FULL_TEXT)


def disk_full_error(path: str | os.PathLike, exc: BaseException, kept: str = "") -> DiskFullError:
    """The error to raise when writing ``path`` failed with ``exc`` (see :func:`is_disk_full`);
    ``kept`` says what was already written and stays usable."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
        str(exc).strip().splitlines()[0][:200]
    return DiskFullError(f"no space left to write {path} ({reason}); {kept + '; ' if kept else ''}"
                         "free disk space (or raise the file size limit, ulimit -f), then run "
                         "the command again")


def check_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """DiskFullError, before anything is written, when ``path``'s disk has less free space
    than ``needed`` bytes, or the file size limit (``ulimit -f``) is lower.

    For files that HDF5 writes: a write that fails inside h5py can leave the process in a
    state where closing the file crashes it, so a size known in advance is checked first.
    """
    path = Path(path)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, ValueError):  # not on Unix
        limit = -1
    free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    for room, kind in ((free, "free on its disk"), (limit, "allowed by the file size limit")):
        if 0 <= room < needed:
            raise DiskFullError(f"no space left to write {path}: {what} needs at least "
                                f"{needed / 2**20:,.1f} MiB, {room / 2**20:,.1f} MiB {kind}; "
                                "nothing was written; free disk space (or raise the file "
                                "size limit, ulimit -f), then run the command again")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write ``path``'s content to a temporary file beside it, then
    rename it over ``path``: readers see the old file or the new one, never a part. The
    temporary file is removed when ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, exc, f"{path.name} is as it was") from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
