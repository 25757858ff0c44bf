"""``torchrun -m cxrembed cache``: each rank decodes its share into a shard; rank 0 joins.

Decoding is the one CPU-bound step before any GPU is booked (~60 core-hours for 10M
images, docs/scaling.md), so it spreads over the CPU nodes of a cluster: every rank takes
a contiguous share of the dataset's rows and decodes it into ``PIXELS.h5.shard-R-of-W.h5``,
an ordinary pixel cache of those rows, built and resumed exactly as a one-process cache
is (a rank killed at any point continues where it stopped when the same command runs
again). The shard files, ``.done`` markers and rank 0's wait are :mod:`cxrembed.sharding`'s,
shared with the sharded encode. Rank 0 then joins the shards into ``PIXELS.h5``, whose
pixels, ids and skipped images are those of a one-process cache, byte for byte.

The join is an HDF5 virtual dataset by default (``--join virtual``): ``PIXELS.h5`` holds
the ids, the done flags and the attributes, and its ``pixels`` map onto the shards'
(named relative to its folder, so the folder can move as a whole). Measured by
``benchmarks/bench_cache_join.py`` (benchmarks/RESULTS.md, "cache join"; 10,000 and
20,000 rows of 224 px in 4 and 8 shards, a loaded 2-core machine): the virtual join took
0.15-0.44 s (under 0.1 s of CPU), the copy 3.5 s and 14-15 s (0.7 and 2.4 s of CPU; the
rest is writing 479 and 958 MiB), and PixelCache read the two at rates that could not be
told apart (consecutive batches of 512 as encode reads them, random batches of 256 as adapt
does: which was faster flipped between identical runs). Scaled to 10M images the
copy is one more pass over 502 GB, on rank 0 alone, while every other node waits, and it
needs those 502 GB free beside the shards until they are removed: about as long as the
decoding it follows once that is spread over a few hundred cores (docs/scaling.md). So
the cache, unlike the store (:mod:`cxrembed.store.join`: ~11 GB at 10M rows, appended to
and moved around), joins virtually. The price: the shards are the data and must stay
beside the cache; :class:`~cxrembed.data.cache.PixelCache` refuses a cache whose shard is
missing (HDF5 itself would read its rows as zeros). ``--join copy`` writes one
self-contained file instead and removes the shards (e.g. before copying the cache to
each node's local disk).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from cxrembed import sharding
from cxrembed.distributed import Launch, rank_share
from cxrembed.errors import DataError
from cxrembed.files import atomic_write

log = logging.getLogger(__name__)

COPY_ROWS = 1024  # rows copied per step by --join copy (49 MiB at 224 px)
#: Attributes that must agree between the shards of one cache.
SAME_IN_EVERY_SHARD = ("format", "size", "decoder", "preprocessing")


def build_cache_shards(dataset, out: Path, here: Launch, *, size: int, decoder: str,
                       workers: int | None, overwrite: bool, progress: bool, skip_bad: bool,
                       join: str = "virtual") -> Path:
    """Rank ``here.rank``'s part of a sharded :func:`~cxrembed.data.cache.build_pixel_cache`:
    every rank returns ``out``, which only rank 0's return guarantees to be finished. Every
    rank must see ``out``'s folder on one shared file system."""
    from cxrembed.data.cache import build_one_cache

    start, stop = rank_share(len(dataset), here.world_size, here.rank)
    shard = sharding.shard_path(out, here.rank, here.world_size)
    if workers is None:  # this node's cores (as allotted, e.g. by Slurm), shared by its ranks
        workers = max(1, len(os.sched_getaffinity(0)) // _ranks_on_this_node())

    def check() -> str | None:  # rank 0, before any rank starts its shard
        if overwrite:
            out.unlink(missing_ok=True)
            sharding.remove_all_shards(out)
        state = sharding.joined_state(out, thing="pixel cache",
                                      one_process="`cxrembed cache`", error=DataError)
        if state is None:  # a joined cache's own shards are its data, not stale ones
            sharding.refuse_other_world_shards(out, here.world_size, what="pixel cache",
                                               resume="", error=DataError)
        return state

    state = sharding.agree_on_start(here, sharding.done_path(shard), check, DataError)
    if state == "complete":  # rank 0 checks it covers this dataset (resumes none), alone
        if here.main:
            build_one_cache(dataset, out, size=size, decoder=decoder, workers=workers,
                            overwrite=False, progress=progress, skip_bad=skip_bad)
        return out
    if stop > start:
        part = dataset.subset(np.arange(start, stop))
        _check_shard_images(shard, part.image_id.astype(str), here)
        log.info("%s: rows %d-%d of %d into %s", here, start, stop - 1, len(dataset), shard)
        build_one_cache(part, shard, size=size, decoder=decoder, workers=workers,
                        overwrite=False, progress=progress and here.main, skip_bad=skip_bad)
    sharding.write_marker(sharding.done_path(shard), here, stop - start, None)
    if not here.main:
        return out
    markers = sharding.wait_for_shards(out, here.world_size, DataError)
    parts = [sharding.shard_path(out, m["rank"], here.world_size) for m in markers if m["rows"]]
    began = time.perf_counter()
    join_caches(out, parts, join)
    log.info("joined %d shards into %s (%s) in %.1f s", len(parts), out, join,
             time.perf_counter() - began)
    sharding.remove_markers(out, here.world_size)
    if join == "copy":
        for part in parts:
            part.unlink(missing_ok=True)
    return out


def _ranks_on_this_node() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun
    except ValueError:
        return 1


def _check_shard_images(shard: Path, ids: np.ndarray, here: Launch) -> None:
    """A shard left by an earlier run must hold exactly this rank's share: the dataset
    may have changed since, and then the rows it covers are not this rank's any more."""
    import h5py

    if not shard.exists():
        return
    try:
        with h5py.File(shard, "r") as f:
            held = f["image_id"].asstr()[:]
    except (OSError, KeyError):
        return  # not a cache: build_one_cache names the file and what to do
    if len(held) != len(ids) or not np.array_equal(held, ids):
        raise DataError(f"shard {shard} ({here}) holds other images than this rank's share "
                        f"of the dataset ({len(held):,} vs {len(ids):,}; the dataset changed "
                        "since it was started); pass --overwrite to start over")


def join_caches(out: Path, parts: list[Path], join: str = "virtual") -> Path:
    """Write the complete caches ``parts`` (consecutive rows) as one complete cache at
    ``out``: ``virtual`` maps its pixels onto the parts' files (which must then stay
    beside it), ``copy`` copies them. Written with :func:`cxrembed.files.atomic_write`
    (under ``OUT.tmp``, then renamed), so a kill leaves either no cache or the whole one."""
    import h5py

    if not parts:
        raise DataError(f"no shard to join into {out}")
    files = [h5py.File(p, "r") for p in parts]
    try:
        _check_parts(parts, files)
        atomic_write(out, lambda tmp: _write_joined(tmp, out, parts, files, join))
    finally:
        for f in files:
            f.close()
    return out


def _write_joined(path: Path, out: Path, parts: list[Path], files: list, join: str) -> None:
    """The joined cache's content, written at ``path`` (renamed to ``out`` once whole)."""
    import h5py

    ids = np.concatenate([f["image_id"].asstr()[:] for f in files])
    size, decoder = int(files[0].attrs["size"]), str(files[0].attrs["decoder"])
    with h5py.File(path, "w") as dst:
        if join == "copy":
            from cxrembed.data.cache import create_cache
            from cxrembed.files import check_space

            check_space(path, len(ids) * size * size, f"a copy of {len(ids):,} images")
            create_cache(dst, ids, size, decoder)
            _copy_pixels(files, dst["pixels"])
        else:
            from cxrembed.data.cache import create_rows

            create_rows(dst, ids, size, decoder)
            _map_pixels(parts, files, dst, out.parent)
        dst["done"][:] = np.concatenate([f["done"][:] for f in files])
        skipped: dict[str, str] = {}
        for f in files:
            skipped.update(json.loads(f.attrs.get("skipped") or "{}"))
        dst.attrs["skipped"] = json.dumps(skipped)
        dst.flush()
        dst.attrs["complete"] = True


def _check_parts(parts: list[Path], files: list) -> None:
    """The parts are complete, agree, and hold pixels of this cxrembed's preprocessing
    (the joined file is stamped with it)."""
    from cxrembed.data.cache import refuse_other_encoding

    for path, f in zip(parts, files):
        if not f.attrs.get("complete", False):
            raise DataError(f"shard {path} is not complete; run the same command again")
        refuse_other_encoding(path, f.attrs)
        for key in SAME_IN_EVERY_SHARD:
            if f.attrs.get(key) != files[0].attrs.get(key):
                raise DataError(f"shards {parts[0]} and {path} differ in {key}; they are not "
                                "parts of one cache: pass --overwrite to start over")


def _map_pixels(parts: list[Path], files: list, dst, folder: Path) -> None:
    import h5py

    first = files[0]["pixels"]
    total = sum(f["pixels"].shape[0] for f in files)
    layout = h5py.VirtualLayout(shape=(total,) + first.shape[1:], dtype=first.dtype)
    at = 0
    for path, f in zip(parts, files):
        n = f["pixels"].shape[0]
        # Relative to the cache's folder (where HDF5 looks first): the folder can move.
        name = os.path.relpath(path, folder)
        layout[at:at + n] = h5py.VirtualSource(name, "pixels", shape=f["pixels"].shape)
        at += n
    dst.create_virtual_dataset("pixels", layout, fillvalue=0)


def _copy_pixels(files: list, target) -> None:
    at = 0
    for f in files:
        source = f["pixels"]
        for start in range(0, source.shape[0], COPY_ROWS):
            block = source[start:start + COPY_ROWS]
            target[at + start:at + start + len(block)] = block
        at += source.shape[0]
