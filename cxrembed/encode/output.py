"""Writer side of an encode: create or reopen the store, match its rows to the selection.

A resumed store keeps its rows. The images selected now are matched to them by id: a
store row whose image is no longer selected (removed from disk, or from the lists) is
dropped when the store is finished; an image selected now that the store has no row for
cannot be added to it, and is refused with what to run instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.encode.reader import GONE
from cxrembed.errors import StoreError

log = logging.getLogger(__name__)


def remove_store_files(out: Path) -> None:
    """The store, its index and the sidecars an encode writes beside it."""
    from cxrembed.store import index_path

    index = index_path(out)
    for path in (out, index, index.with_name(index.name + ".json"),
                 out.with_name(out.name + ".skipped.json")):
        path.unlink(missing_ok=True)


def match_rows(out: Path, stored_ids: np.ndarray, stored_split: np.ndarray,
               ids: np.ndarray, split: np.ndarray, done_skips: set[str] = frozenset()
               ) -> np.ndarray:
    """For each store row, the row of the selection holding its image (-1: gone).

    Raises StoreError when an image selected now has no row in the store (and was not
    skipped by the earlier run), or when a kept image changed split.
    """
    position = {name: i for i, name in enumerate(ids)}
    source_rows = np.fromiter((position.get(name, -1) for name in stored_ids), np.int64,
                              count=len(stored_ids))
    known = set(stored_ids) | set(done_skips)
    new = [name for name in ids if name not in known]
    if new:
        raise StoreError(
            f"store {out} was started on other images: {len(new)} image(s) selected now "
            f"have no row in it (first: {', '.join(new[:3])}); resume with the same data, "
            "--split and --limit, or pass --overwrite to encode again (or --out another "
            "store)")
    kept = source_rows >= 0
    moved = np.flatnonzero(kept & (stored_split != split[np.maximum(source_rows, 0)]))
    if len(moved):
        row = int(moved[0])
        raise StoreError(
            f"image {stored_ids[row]} is in split {split[source_rows[row]]} now but "
            f"{stored_split[row]} in store {out} (the patient split changed with the images "
            "removed): the store's rows cannot be kept; pass --overwrite to encode again")
    return source_rows


def reopen(out: Path, fingerprint: dict, ids: np.ndarray, split: np.ndarray
           ) -> tuple[Any, np.ndarray]:
    """Reopen the store at ``out`` to continue it; returns the writer and, per store row,
    the selection row of its image (-1: gone)."""
    from cxrembed.store import StoreWriter

    writer = StoreWriter.resume(out, fingerprint=fingerprint)
    try:
        stored_ids, stored_split = writer.column("image_id"), writer.column("split")
        if writer.complete:
            skipped = {s["image_id"] for s in writer.attrs.get("skipped_images") or []}
            source_rows = match_rows(out, stored_ids, stored_split, ids, split, skipped)
            if (source_rows < 0).any():
                log.warning("store %s is complete; %d of its images are no longer in the "
                            "dataset and stay in it", out, int((source_rows < 0).sum()))
            return writer, source_rows
        source_rows = match_rows(out, stored_ids, stored_split, ids, split)
        if (source_rows < 0).any():
            log.warning("%d image(s) of store %s are no longer in the dataset (first: %s): "
                        "their rows are dropped when the store is finished",
                        int((source_rows < 0).sum()), out, stored_ids[source_rows < 0][0])
        gone_done = {int(r): GONE for r in np.flatnonzero(source_rows[:writer.rows_done] < 0)
                     if int(r) not in writer.skipped}
        if gone_done:
            writer.mark_skipped(gone_done)
        return writer, source_rows
    except BaseException:
        writer.close()
        raise


def row_fields(dataset: Any) -> dict[str, np.ndarray]:
    """The store's row-aligned metadata of a dataset's images."""
    root = str(dataset.root)
    rel = np.array([os.path.relpath(p, root) if p else "" for p in dataset.path], dtype=str)
    return {"image_id": dataset.image_id, "patient_id": dataset.patient_id,
            "follow_up": dataset.follow_up, "split": dataset.split, "view": dataset.view,
            "sex": dataset.sex, "age": dataset.age, "labels": dataset.labels,
            "image_path": rel, "label_known": getattr(dataset, "label_known", None)}


def encoder_attrs(encoder: Any) -> dict[str, Any]:
    """The store attributes that describe an encoder (model, weights, run, how to reload)."""
    source = getattr(encoder, "source", None)  # a WeightsSource (absent on test doubles)
    load_args = getattr(encoder, "load_args", None)
    return {"model_name": encoder.model_name,
            "weights_source": str(getattr(source, "name", "") or ""),
            "weights_sha256": str(getattr(source, "sha256", "") or ""),
            "run": str(getattr(encoder, "run", None) or ""),
            "load_args": _absolute_paths(load_args) if isinstance(load_args, dict) else None,
            # the collection naming the head's classes (a label map matches on it)
            "head_vocabulary": getattr(encoder, "vocabulary", None) or ""}


def _absolute_paths(args: dict) -> dict:
    """Weights files and run folders as absolute paths, so a reload works from anywhere."""
    out = dict(args)
    for key in ("pretrained", "checkpoint"):
        value = out.get(key)
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out
