"""Joining the shards of a torchrun encode: a copy into one file (what ``encode`` does)
against an HDF5 virtual dataset over the shards, in the same run.

Writes ``--shards`` stores of random float16 vectors (``--rows`` in all, ``--dim``-d), then
for each way of joining: the seconds to join, the joined file's size, the seconds to read
every vector in 65,536-row blocks (what building an index does) and to read 2,000 random
rows (what a search's results read). Files are in the page cache for both (just written).

    python benchmarks/bench_join.py [--rows N] [--shards W] [--dim D] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrembed.store import StoreWriter
from cxrembed.store.join import COPY_ROWS, join_stores


def make_shard(path: Path, rows: int, dim: int, seed: int, first_row: int) -> None:
    """A complete store of ``rows`` random vectors, written as an encode writes one."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"{first_row + i:08d}_000.png" for i in range(rows)])
    fields = {"image_id": ids, "patient_id": np.arange(rows) + first_row,
              "follow_up": np.zeros(rows, np.int64), "split": np.full(rows, "train"),
              "view": np.full(rows, "PA"), "sex": np.full(rows, "M"),
              "age": np.full(rows, 50.0, np.float32),
              "labels": (rng.random((rows, 14)) < 0.1).astype(np.uint8),
              "image_path": np.array([f"images/{i}" for i in ids])}
    writer = StoreWriter.create(path, rows=fields, embed_dim=dim, fingerprint={"bench": 1},
                                has_head=False, has_text=False, batch_size=256,
                                chunk_rows=COPY_ROWS // 4)
    with writer:
        for start in range(0, rows, 16_384):
            n = min(16_384, rows - start)
            writer.append(rng.standard_normal((n, dim), dtype=np.float32))
        writer.finish()


def join_virtual(out: Path, parts: list[Path]) -> None:
    """The alternative: row metadata copied, vectors as virtual datasets over the shards."""
    import h5py

    files = [h5py.File(p, "r") for p in parts]
    try:
        sizes = [f["embedding"].shape[0] for f in files]
        total = sum(sizes)
        with h5py.File(out, "w") as dst:
            for key, value in files[0].attrs.items():
                dst.attrs[key] = value
            dst.attrs["num_rows"] = total
            for name in files[0]:
                first = files[0][name]
                if name in ("embedding", "embedding_norm"):
                    layout = h5py.VirtualLayout(shape=(total,) + first.shape[1:],
                                                dtype=first.dtype)
                    at = 0
                    for path, f, n in zip(parts, files, sizes):
                        # relative to the joined file, so the folder can move as one
                        source = h5py.VirtualSource(os.path.relpath(path, out.parent), name,
                                                    shape=f[name].shape)
                        layout[at:at + n] = source
                        at += n
                    dst.create_virtual_dataset(name, layout)
                elif name == "rows_done":
                    dst.create_dataset(name, data=np.array([total], np.int64))
                else:
                    dst.create_dataset(name, data=np.concatenate([f[name][:] for f in files]))
    finally:
        for f in files:
            f.close()


def read_all(path: Path) -> float:
    import h5py

    began = time.perf_counter()
    with h5py.File(path, "r") as f:
        x = f["embedding"]
        total = 0.0
        for start in range(0, x.shape[0], COPY_ROWS):
            total += float(x[start:start + COPY_ROWS][:, 0].astype(np.float32).sum())
    return time.perf_counter() - began


def read_random(path: Path, rows: np.ndarray) -> float:
    import h5py

    began = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["embedding"][rows]
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_join_", dir=args.dir))
    try:
        per = -(-args.rows // args.shards)
        parts = []
        began = time.perf_counter()
        for r in range(args.shards):
            n = min(per, args.rows - r * per)
            parts.append(work / f"store.h5.shard-{r}-of-{args.shards}.h5")
            make_shard(parts[-1], n, args.dim, seed=r, first_row=r * per)
        print(f"{args.shards} shards of {args.rows:,} {args.dim}-d float16 vectors in all "
              f"({sum(p.stat().st_size for p in parts) / 2**20:,.0f} MiB) written in "
              f"{time.perf_counter() - began:.1f} s")
        picks = np.sort(np.random.default_rng(0).choice(args.rows, 2000, replace=False))
        for how, join in (("copy", lambda o: join_stores(o, parts)),
                          ("virtual", lambda o: join_virtual(o, parts))):
            out = work / f"{how}.h5"
            began = time.perf_counter()
            join(out)
            seconds = time.perf_counter() - began
            print(f"  {how:8s} join {seconds:7.2f} s   file {out.stat().st_size / 2**20:8.1f} MiB"
                  f"   read all {read_all(out):6.2f} s   2,000 random rows "
                  f"{read_random(out, picks) * 1e3:7.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
