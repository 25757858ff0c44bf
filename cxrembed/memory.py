"""Memory a step will need, estimated from shapes before anything is loaded, against what
the machine (or the process's limits) can give: a step that cannot fit fails at once with
the figures, instead of swapping for an hour or being killed by the kernel."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30


def available_bytes() -> int | None:
    """Bytes this process may still take: the least of the memory the kernel reports
    available, the cgroup's remaining limit, and the address-space limit (None: unknown)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the container's limit, less what it already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            found.append(soft)
    except (ImportError, ValueError):
        pass
    return min(found) if found else None


def check_memory(needed: int, what: str, hint: str) -> None:
    """ConfigError when ``needed`` bytes exceed what is available (nothing is loaded yet)."""
    free = available_bytes()
    log.debug("%s: about %.2f GiB needed, %s available", what, needed / GIB,
              "unknown" if free is None else f"{free / GIB:.2f} GiB")
    if free is not None and needed > free:
        raise ConfigError(f"{what} needs about {needed / GIB:,.1f} GiB of memory, "
                          f"{free / GIB:,.1f} GiB are available; {hint}")


def fewshot_bytes(rows: int, test_rows: int, dim: int, classes: int) -> int:
    """What a few-shot sweep holds at once: every row's labels, known mask, patient, split
    and id (about 3 x 64 bytes of strings a row), the test rows' vectors as float32 three
    times (raw, unit, the normalising temporary) and their score matrices (a few float64
    copies per head while AUCs are bootstrapped)."""
    metadata = rows * (2 * classes + 3 * 64)
    vectors = test_rows * dim * 4 * 3
    scores = test_rows * classes * 8 * 4
    return metadata + vectors + scores


def check_fewshot_store(path: str | os.PathLike, test_split: str = "test") -> None:
    """Refuse, before loading it, a sweep on a store too large for this machine's memory
    (shapes read from the file; the split column is the one column read)."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            rows, dim = f["embedding"].shape
            classes = f["labels"].shape[1]
            split = f["split"]
            test = 0
            for start in range(0, rows, 1 << 20):  # the column in slices: 10M rows stay light
                part = split[start:start + (1 << 20)]  # fixed-width UTF-8 bytes
                test += int(np.count_nonzero(part == test_split.encode()))
    except (OSError, KeyError, ValueError, TypeError):
        return  # not a store this can read: the store reader says why, with the file's name
    check_memory(fewshot_bytes(rows, test, dim, classes),
                 f"a few-shot sweep on store {path} ({rows:,} rows, {test:,} {test_split})",
                 "run it on a machine with more memory, or encode a subset into a store of "
                 "its own (encode --split / --limit)")
