"""The files of a sharded ``torchrun`` job (``encode``, ``cache``): one shard per rank,
a ``.done`` marker once it is finished, rank 0 waiting for every marker.

A command run as rank R of W writes its contiguous share of the rows into
``OUT.shard-R-of-W.h5`` (an ordinary file of the command's own schema, resumed as the
command resumes it) and then the marker ``OUT.shard-R-of-W.h5.done`` (JSON: rank,
world size, rows, the rank's result). Rank 0, once its own shard is done, waits for every
marker and joins the shards into ``OUT``.

Rank 0 waits by watching files, not at a collective, so a rank with more left to do
(one resumed from an earlier, unevenly interrupted run) may take as long as it needs;
a shard whose file has not changed for ``CXREMBED_DIST_TIMEOUT`` seconds ends the wait
with an error naming its rank. A rank that fails ends the job: torchrun stops the others.
Shards of a run with another number of processes cover other rows, so they are refused
(:func:`refuse_other_world_shards`) rather than silently started over beside.
"""

from __future__ import annotations

import glob
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrembed.distributed import Launch, broadcast_object, process_group, timeout
from cxrembed.errors import CxrembedError

POLL_SECONDS = 0.5
SHARD_NAME = r"\.shard-(\d+)-of-(\d+)\.h5"  # what follows OUT's own name


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    return out.with_name(f"{out.name}.shard-{rank}-of-{world_size}.h5")


def done_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done")


def all_shards(out: Path) -> list[Path]:
    """Every shard file of ``out`` (any world size; not the markers), sorted; a file
    whose name only looks like one (``OUT.shard-a-of-b.h5``) is none."""
    return sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.shard-*-of-*.h5")
                  if _world_of(out, p) is not None)


def _world_of(out: Path, shard: Path, suffix: str = "") -> int | None:
    """The world size in the name of a shard of ``out`` followed by ``suffix`` (a regex;
    None: not such a name)."""
    name = shard.name
    found = (re.fullmatch(SHARD_NAME + suffix, name[len(out.name):])
             if name.startswith(out.name) else None)
    return int(found[2]) if found else None


def refuse_other_world_shards(out: Path, world_size: int, *, what: str,
                              resume: str, error: type[CxrembedError]) -> None:
    """``error`` when shards of ``out`` made by another number of processes are there:
    they can only be continued by that number (``resume``: the flag that does it, e.g.
    ``" --resume"``), or removed (``--overwrite``)."""
    other = [p for p in all_shards(out) if _world_of(out, p) != world_size]
    if other:
        worlds = [str(w) for w in sorted({_world_of(out, p) for p in other})]
        raise error(
            f"{len(other)} shard(s) of an earlier {what} into {out} with "
            f"{' or '.join(worlds)} processes are there (first: {other[0]}); continue it "
            f"with --nproc_per_node {worlds[0]}{resume}, or pass --overwrite to start over "
            f"with {world_size}")


def agree_on_start(here: Launch, marker: Path, check: Callable[[], Any],
                   error: type[CxrembedError]) -> Any:
    """Rank 0's ``check()`` on every rank, after each rank removed its stale ``marker``.

    ``check`` runs on rank 0 alone (it may remove files); an ``error`` it raises is
    broadcast and raised on every rank, so that none is left waiting. The process group
    (gloo) lives for this step only: a marker of an earlier run cannot outlive it.
    """
    with process_group("cpu"):
        marker.unlink(missing_ok=True)
        state = None
        if here.main:
            try:
                state = {"state": check()}
            except error as exc:
                state = {"refused": str(exc)}
        state = broadcast_object(state)
    if "refused" in state:
        raise error(state["refused"])
    return state["state"]


def joined_state(out: Path, *, thing: str, one_process: str,
                 error: type[CxrembedError]) -> str | None:
    """``complete`` when ``out`` (a store or a pixel cache: ``thing``) is finished, None
    when there is none; ``error`` for an unreadable file or an unfinished one, which only
    the one-process command (``one_process``) that started it can continue."""
    import h5py

    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            complete = bool(f.attrs.get("complete", False))
    except OSError as exc:
        raise error(f"{out} exists but is not a readable {thing} ({exc}); pass --overwrite "
                    "to replace it") from None
    if not complete:
        raise error(f"{thing} {out} was started by a one-process {one_process}; continue it "
                    "with the same command without torchrun, or pass --overwrite")
    return "complete"


def write_marker(marker: Path, here: Launch, rows: int, result: dict | None) -> None:
    from cxrembed.files import atomic_write_text

    atomic_write_text(marker, json.dumps({
        "rank": here.rank, "world_size": here.world_size, "rows": rows, "result": result}))


def wait_for_shards(out: Path, world_size: int,
                    error: type[CxrembedError] = CxrembedError) -> list[dict]:
    """Every rank's marker, once all are there (rank order). ``error`` naming the rank
    whose shard file has not changed for the collective timeout."""
    stall = timeout().total_seconds()
    markers = [done_path(shard_path(out, r, world_size)) for r in range(world_size)]
    last_seen: dict[int, tuple | None] = {}
    changed: dict[int, float] = {}
    while True:
        waiting = [r for r, m in enumerate(markers) if not m.exists()]
        if not waiting:
            return [json.loads(m.read_text(encoding="utf-8")) for m in markers]
        now = time.monotonic()
        for r in waiting:
            shard = shard_path(out, r, world_size)
            seen = (shard.stat().st_mtime_ns, shard.stat().st_size) if shard.exists() else None
            if r not in changed or last_seen.get(r) != seen:
                last_seen[r], changed[r] = seen, now
            elif now - changed[r] > stall:
                raise error(
                    f"rank {r} of {world_size}: its shard {shard} has not changed for "
                    f"{stall:.0f} s; is that process alive? (CXREMBED_DIST_TIMEOUT sets "
                    "how long to wait)")
        time.sleep(POLL_SECONDS)


def remove_markers(out: Path, world_size: int) -> None:
    for r in range(world_size):
        done_path(shard_path(out, r, world_size)).unlink(missing_ok=True)


def remove_all_shards(out: Path) -> None:
    """Every shard and marker of ``out`` (any world size), and a half-written join."""
    for stale in out.parent.glob(f"{glob.escape(out.name)}.shard-*-of-*.h5*"):
        if _world_of(out, stale, r"(\..*)?") is not None:  # a shard, its marker, its temp
            stale.unlink(missing_ok=True)
    for suffix in (".joining", ".tmp"):  # encode's join, the cache's (atomic_write)
        out.with_name(out.name + suffix).unlink(missing_ok=True)
