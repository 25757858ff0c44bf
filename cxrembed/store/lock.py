"""One writer per store, and readers that know when one is at work: ``STORE.h5.lock``.

Why a lock file and not HDF5's SWMR mode: SWMR needs chunked datasets and files written
with ``libver="latest"`` (readable by HDF5 >= 1.10 only), and it protects one HDF5 file
while an encode also replaces files whole (``.creating``, ``--skip-bad`` compaction,
``--append``'s copy swapped in, the FAISS index beside the store). The store's own write
order already makes the first ``rows_done`` rows final (see :mod:`cxrembed.store.schema`);
what was missing is knowing that a writer is at work, and who. A lock file says that for
the whole operation, names the writer, and needs no change to the file format.

The writer holds an exclusive ``flock`` on ``STORE.h5.lock`` (and writes its pid, host,
purpose and start time into it) for as long as it writes. The kernel releases the lock
when the process ends, however it ends (``kill -9`` included), so a lock left by a dead
writer is never in the way on a local disk. Where ``flock`` is not available (some network
file systems, Windows) the pid written in the file decides, with the process's start time
beside it (``/proc/PID/stat``): a lock of a process that no longer runs on this host, or
whose pid now belongs to a process started at another time (a reused pid), is stale and
taken over; one from another host must be removed by hand (the message says how).

A lock taken for a new ``--out`` folder creates that folder; when the writer gives the lock
back and the folder it created is empty (a start that failed before writing anything), the
folder goes too: a failed start leaves nothing behind.

Readers (:meth:`EmbeddingStore.open`) probe the lock: while another process holds it, a
store is refused with "store ... is being written by process PID", or, when the caller
asked for an incomplete store, opened for its final rows only (``rows_done``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from cxrembed.errors import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: path of a lock -> (open file, count) for locks this process holds (re-entrant).
_HELD: dict[str, list[Any]] = {}
_HELD_LOCK = threading.Lock()


def lock_path(store: str | os.PathLike) -> Path:
    """``STORE.h5.lock`` beside the store."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def _key(store: str | os.PathLike) -> str:
    return str(lock_path(Path(store).absolute()))


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (its lock file names none)"
    return (f"process {owner.get('pid')} on {owner.get('host')} ({owner.get('purpose')}, "
            f"started {owner.get('started')})")


def read_owner(store: str | os.PathLike) -> dict[str, Any] | None:
    """Who the lock file names (pid, host, purpose, started), or None."""
    try:
        owner = json.loads(lock_path(store).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field
    22), or None where there is no /proc or no such process. With the pid it names one
    process: a pid reused by a later process has another start time."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)"
    except (OSError, ValueError, IndexError, OverflowError):
        return None


def _pid_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether the lock's process still runs (None: cannot tell, another host). A live
    pid whose start time differs from the one recorded is another process: not alive."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        pid = int(owner.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True
    recorded, now = owner.get("pid_start"), process_start(pid)
    if isinstance(recorded, int) and now is not None and now != recorded:
        return False  # the pid was reused
    return True


def _try_flock(handle: Any) -> bool | None:
    """True: locked; False: another process holds it; None: flock unsupported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: a file system without flock
        return None


def _refuse(store: Path, owner: dict[str, Any] | None) -> StoreError:
    pid = (owner or {}).get("pid", "PID")
    return StoreError(
        f"store {store} is being written by {describe_owner(owner)}: wait for that encode to "
        f"finish (or stop it), then run again with --resume. The lock is stale if, on "
        f"{(owner or {}).get('host', 'its machine')}, `ps -o lstart=,args= -p {pid}` shows "
        f"no process or one that is not a cxrembed started at that time (its machine was "
        f"lost, or the folder is on a network file system): then remove "
        f"{lock_path(store)} and run again")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir()
        except FileExistsError:  # made by another process meanwhile: not ours to remove
            missing.remove(made)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def acquire(store: str | os.PathLike, purpose: str) -> None:
    """Take the store's writer lock or raise StoreError naming its holder. Re-entrant
    within a process: release once per acquire."""
    store = Path(store)
    key = _key(store)
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key][1] += 1
            return
        created = _make_folder(lock_path(store).parent)  # a new --out folder
        try:
            handle = _take(store)
        except BaseException:
            _remove_if_empty(created)
            raise
        owner = {"pid": os.getpid(), "pid_start": process_start(os.getpid()),
                 "host": socket.gethostname(), "purpose": purpose,
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(owner))
        handle.flush()
        _HELD[key] = [handle, 1, created]


def _take(store: Path) -> Any:
    """The lock file of ``store``, open and locked by this process (StoreError: held)."""
    for _ in range(3):
        handle = open(lock_path(store), "a+", encoding="utf-8")
        got = _try_flock(handle)
        if got is False:
            handle.seek(0)
            owner = read_owner(store)
            handle.close()
            raise _refuse(store, owner)
        if got is None:  # no flock: the pid in the file decides
            owner = read_owner(store)
            if owner and owner.get("pid") != os.getpid() and _pid_alive(owner) is not False:
                handle.close()
                raise _refuse(store, owner)
            if owner:
                log.warning("taking over the stale lock of %s (%s)", store,
                            describe_owner(owner))
        try:  # the file we locked may have been unlinked by a releasing writer: retry
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path(store)).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    else:  # pragma: no cover - three releases raced with us in a row
        raise StoreError(f"cannot take the lock {lock_path(store)}; run again")
    return handle


def release(store: str | os.PathLike) -> None:
    """Give back one :func:`acquire`; the last one removes the lock file and unlocks."""
    key = _key(store)
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        handle = entry[0]
        try:
            Path(key).unlink(missing_ok=True)  # before unlocking: no one waits on a dead file
        finally:
            handle.close()  # closing releases the flock
        _remove_if_empty(entry[2])  # a failed start leaves no empty --out folder behind


@contextmanager
def store_lock(store: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold the writer lock of ``store`` for the ``with`` block."""
    acquire(store, purpose)
    try:
        yield
    finally:
        release(store)


def held_here(store: str | os.PathLike) -> bool:
    """Whether this process holds the writer lock of ``store`` now."""
    return _key(store) in _HELD


def writer_at_work(store: str | os.PathLike) -> dict[str, Any] | None:
    """The owner of the lock when *another* process is writing ``store`` now, else None."""
    store = Path(store)
    path = lock_path(store)
    if _key(store) in _HELD or not path.exists():
        return None
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return None
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                return None  # nobody holds it: a lock file left behind
            except BlockingIOError:
                return read_owner(store) or {}
            except OSError:
                pass
    owner = read_owner(store)
    return owner if owner and _pid_alive(owner) is not False else None


def holding_lock(argument: str | Any, purpose: str) -> Any:
    """Decorator: the function holds the writer lock of the store named by its parameter
    ``argument`` (or returned by ``argument(arguments)``, given the call's arguments by
    name) for the whole call (an encode: create or resume, rows, compaction, index);
    under torchrun (``WORLD_SIZE`` > 1) only rank 0 takes it."""
    import functools
    import inspect

    def decorate(function: Any) -> Any:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("RANK", "0") != "0":
                # under torchrun rank 0 holds the store's lock; the other ranks write only
                # their own shard files, each locked by its StoreWriter
                return function(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs).arguments
            store = argument(arguments) if callable(argument) else arguments[argument]
            with store_lock(store, purpose):
                return function(*args, **kwargs)

        return locked

    return decorate
