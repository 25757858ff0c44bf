"""Joining complete stores of consecutive rows (the shards of a ``torchrun`` encode) into
one store, by copy.

The joined file is an ordinary store (``schema.py``) with every row written and not yet
marked complete: every row-aligned dataset is the shards' rows one after the other, the
attributes are the first shard's with the row count, ``uuid``, ``created`` and
``skipped_images`` (all the shards') rewritten. The encode then finishes it as it
finishes any store (health and search figures over all rows, the complete flag) and
renames it over ``STORE.h5``, so a kill leaves either no store or the whole one.

A copy, not an HDF5 virtual dataset over the shards: the copy costs one sequential pass
over the vectors (measured by ``benchmarks/bench_join.py``: see benchmarks/RESULTS.md),
and in exchange the store stays one self-contained file that can be moved, appended to
(``encode --append``) and read without its shards beside it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import StoreError
from cxrembed.store.schema import read_attrs

log = logging.getLogger(__name__)

COPY_ROWS = 65_536  # rows copied per step (32 MiB of 512-d float16 vectors)
#: Attributes that must agree between the shards of one store.
SAME_IN_EVERY_PART = ("format_version", "embed_dim", "fingerprint", "has_head", "has_text",
                      "label_names", "head_label_names", "model_name", "batch_size")


def _check_parts(parts: list[Path], files: list[Any]) -> list[dict]:
    attrs = [read_attrs(f.attrs) for f in files]
    for path, a in zip(parts, attrs):
        if not a.get("complete"):
            raise StoreError(f"shard {path} is not complete; rerun the encode with --resume")
        for key in SAME_IN_EVERY_PART:
            if a.get(key) != attrs[0].get(key):
                raise StoreError(f"shards {parts[0]} and {path} differ in {key} ("
                                 f"{attrs[0].get(key)!r} vs {a.get(key)!r}); they are not "
                                 "parts of one store: encode again with --overwrite")
    return attrs


def join_stores(target: str | os.PathLike, parts: list[str | os.PathLike],
                attrs: dict[str, Any] | None = None) -> Path:
    """Write ``target`` holding the rows of the complete stores ``parts`` in order, every
    row written (``rows_done``) but not marked complete; ``attrs`` (JSON-able, e.g. the
    ``selection``) override the first part's. A failure removes ``target``."""
    import h5py

    from cxrembed.store.schema import JSON_ATTRS
    from cxrembed.store.create import early_dcpl

    target, parts = Path(target), [Path(p) for p in parts]
    if not parts:
        raise StoreError(f"no shards to join into {target}")
    files = [h5py.File(p, "r") for p in parts]
    try:
        part_attrs = _check_parts(parts, files)
        sizes = [int(a["num_rows"]) for a in part_attrs]
        total = sum(sizes)
        with h5py.File(target, "w") as dst:
            for name, obj in files[0].items():
                if isinstance(obj, h5py.Group):  # text prompts and their embeddings
                    files[0].copy(obj, dst, name=name)
                elif name == "rows_done":
                    dst.create_dataset(name, data=np.array([total], np.int64),
                                       dcpl=early_dcpl())
                else:
                    _concatenate(files, dst, name, sizes, total, early_dcpl())
            skipped = [s for a in part_attrs for s in (a.get("skipped_images") or [])]
            merged = {**part_attrs[0], **(attrs or {}), "num_rows": total,
                      "uuid": uuid.uuid4().hex, "finished": "", "complete": False,
                      "created": min(a["created"] for a in part_attrs)}
            merged.pop("skipped_images", None)
            if skipped:
                merged["skipped_images"] = skipped
            for key in list(dst.attrs):
                del dst.attrs[key]
            for key, value in merged.items():
                dst.attrs[key] = json.dumps(value) if key in JSON_ATTRS else \
                    ("" if value is None else value)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        for f in files:
            f.close()
    log.info("joined %d shards (%d rows) into %s", len(parts), total, target)
    return target


def _concatenate(files: list[Any], dst: Any, name: str, sizes: list[int], total: int,
                 dcpl: Any) -> None:
    """``dst[name]`` = the parts' ``name`` datasets one after the other, block by block."""
    first = files[0][name]
    dtype = first.dtype
    if dtype.kind == "S":  # fixed-width strings: as wide as the widest part's
        dtype = np.dtype(f"S{max(f[name].dtype.itemsize for f in files)}")
    target = dst.create_dataset(name, shape=(total,) + first.shape[1:], dtype=dtype, dcpl=dcpl)
    at = 0
    for f, size in zip(files, sizes):
        source = f[name]
        if source.shape[0] != size:
            raise StoreError(f"{f.filename}: {name} has {source.shape[0]} rows, not {size}")
        for start in range(0, size, COPY_ROWS):
            block = source[start:min(size, start + COPY_ROWS)]
            target[at + start:at + start + len(block)] = block
        at += size
