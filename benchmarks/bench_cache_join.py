"""Joining the shards of a torchrun pixel cache: an HDF5 virtual dataset over the shards
(what ``cache`` does by default) against a copy into one file, in the same run.

Writes ``--shards`` complete shard caches of ``--rows`` random 224 px rows in all (the
cache's own layout; random bytes: what the join and the reads do does not depend on the
pixels), then for each way of joining: the seconds (wall and CPU) to join, the joined
file's size, and the rate at which :class:`~cxrembed.data.cache.PixelCache` reads it as
the encoder does (consecutive batches of ``--encode-batch`` rows) and as adapt does
(random batches of ``--batch`` rows, a shuffled epoch). Each read pass runs twice, in
alternating order, and the faster is kept. The files are in the page cache for both
(just written).

    python benchmarks/bench_cache_join.py [--rows N] [--shards W] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrembed.data.cache import PixelCache, create_cache
from cxrembed.data.cache_shards import join_caches
from cxrembed.data.images import IMAGE_SIZE


def make_shard(path: Path, rows: int, first_row: int, seed: int) -> None:
    """A complete shard cache of ``rows`` random images (as a finished rank leaves it)."""
    import h5py

    rng = np.random.default_rng(seed)
    ids = np.array([f"{first_row + i:08d}_000.png" for i in range(rows)])
    with h5py.File(path, "w") as f:
        create_cache(f, ids, IMAGE_SIZE, "opencv")
        for start in range(0, rows, 1024):
            n = min(1024, rows - start)
            f["pixels"][start:start + n] = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE),
                                                        dtype=np.uint8)
        f["done"][:] = True
        f.attrs["complete"] = True


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def read_rate(path: Path, batches: list[np.ndarray]) -> tuple[float, float]:
    """Images per second of wall time and per second of CPU time reading ``batches``
    through PixelCache (on a loaded machine the CPU rate is the steadier figure)."""
    cache = PixelCache(path)
    try:
        wall, cpu = timed(lambda: [cache.read(b) for b in batches])
    finally:
        cache.close()
    images = sum(len(b) for b in batches)
    return images / wall, images / max(cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="adapt's random batches")
    parser.add_argument("--encode-batch", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cache_join_", dir=args.dir))
    try:
        per = -(-args.rows // args.shards)
        parts = []
        began = time.perf_counter()
        for r in range(args.shards):
            parts.append(work / f"px.h5.shard-{r}-of-{args.shards}.h5")
            make_shard(parts[-1], min(per, args.rows - r * per), r * per, seed=r)
        size = sum(p.stat().st_size for p in parts)
        print(f"{args.shards} shard caches of {args.rows:,} {IMAGE_SIZE} px rows in all "
              f"({size / 2**20:,.0f} MiB) written in {time.perf_counter() - began:.1f} s")
        rng = np.random.default_rng(0)
        order = rng.permutation(args.rows)
        shuffled = [order[i:i + args.batch] for i in range(0, args.rows, args.batch)]
        sequential = [np.arange(i, min(i + args.encode_batch, args.rows))
                      for i in range(0, args.rows, args.encode_batch)]
        joined = {}
        for how in ("copy", "virtual"):
            out = work / f"{how}.h5"
            wall, cpu = timed(lambda: join_caches(out, parts, how))
            joined[how] = out
            print(f"  {how:8s} join {wall:7.2f} s (CPU {cpu:6.2f} s)   file "
                  f"{out.stat().st_size / 2**20:8.1f} MiB")
        rates: dict[tuple[str, str], tuple[float, float]] = {}
        for attempt in range(2):  # alternate the order: neither always reads second
            for how in (("copy", "virtual") if attempt == 0 else ("virtual", "copy")):
                for kind, batches in (("encode", sequential), ("adapt", shuffled)):
                    rate = read_rate(joined[how], batches)
                    best = rates.get((how, kind), (0.0, 0.0))
                    rates[how, kind] = (max(best[0], rate[0]), max(best[1], rate[1]))
        print("  read, images/s of wall time (of CPU time):")
        for how in ("copy", "virtual"):
            (ew, ec), (aw, ac) = rates[how, "encode"], rates[how, "adapt"]
            print(f"  {how:8s} consecutive batches of {args.encode_batch} (encode) {ew:8,.0f} "
                  f"({ec:8,.0f})   random batches of {args.batch} (adapt) {aw:8,.0f} "
                  f"({ac:8,.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
