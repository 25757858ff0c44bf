"""Dropping rows from a fully written store (images skipped by ``encode --skip-bad``).

The rows are preallocated when a store is created, so skipped images leave zero rows
behind until the encode ends; then the store is copied without them into
``STORE.h5.compacting`` and renamed over the original. A kill during the copy leaves the
original (every row written, not yet complete): ``--resume`` finishes it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

COPY_BLOCK = 65_536  # rows copied per step


def drop_rows(path: str | os.PathLike, skipped: dict[int, str], *, finished: str) -> None:
    """Rewrite the store at ``path`` without the ``skipped`` rows, marked complete, with
    ``skipped_images`` = ``[{"image_id", "reason"}]`` in its attributes."""
    import h5py

    from cxrembed.store.create import early_dcpl

    path = Path(path)
    tmp = path.with_name(path.name + ".compacting")
    try:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
            n = int(src.attrs["num_rows"])
            keep = np.ones(n, dtype=bool)
            keep[np.fromiter(skipped, dtype=np.int64)] = False
            kept = int(keep.sum())
            ids = src["image_id"][:]
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            dst.attrs["num_rows"] = kept
            dst.attrs["skipped_images"] = json.dumps(
                [{"image_id": ids[r].decode("utf-8"), "reason": why}
                 for r, why in sorted(skipped.items())])
            dst.attrs["finished"] = finished
            dst.attrs["complete"] = True
            for name, obj in src.items():
                if isinstance(obj, h5py.Group):
                    src.copy(obj, dst, name=name)
                elif name == "rows_done":
                    dst.create_dataset(name, data=np.array([kept], np.int64), dcpl=early_dcpl())
                else:
                    _copy_kept(obj, dst, name, keep, kept, early_dcpl())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_kept(src: Any, dst: Any, name: str, keep: np.ndarray, kept: int, dcpl: Any) -> None:
    out = dst.create_dataset(name, shape=(kept,) + src.shape[1:], dtype=src.dtype, dcpl=dcpl)
    at = 0
    for start in range(0, len(keep), COPY_BLOCK):
        mask = keep[start:start + COPY_BLOCK]
        block = src[start:start + len(mask)][mask]
        out[at:at + len(block)] = block
        at += len(block)
