"""The decoding processes of a pixel cache build (``cache --workers N``)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor


class _InProcess:
    """A stand-in for a process pool when workers=0 (debugging, tiny datasets)."""

    map = staticmethod(map)

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _die_with_parent() -> None:
    """Worker initializer: on Linux, end this worker when the parent dies (even by kill -9),
    instead of leaving an orphan behind."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def decode_pool(workers: int):
    """A pool of ``workers`` decoding processes, all started (0: this process)."""
    if workers == 0:
        return _InProcess()
    # The platform's default start method: workers need only numpy + OpenCV, and (unlike
    # spawn) a user's script without an `if __name__ == "__main__"` guard still works.
    pool = ProcessPoolExecutor(workers, initializer=_die_with_parent)
    list(pool.map(abs, range(workers)))  # start every worker now (fork starts them all)
    return pool
