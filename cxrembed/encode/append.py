"""``cxrembed encode --append``: new images added to a finished store, old rows untouched.

An HDF5 store's arrays have a fixed size, so appending writes ``STORE.h5.appending``: the
old rows copied as stored (bit for bit, in their order), then the new images encoded after
them by the same reader -> mapper -> writer pipeline, in chunks that survive a kill (a
rerun of the same command continues the ``.appending`` file). When it is complete it
replaces the store, and the FAISS index beside it is extended with the new vectors
(``index.add``: flat, IVF and HNSW all take new vectors without a rebuild; IVF keeps the
cells it was trained on). Refused: another encoder (fingerprint), another label set, and
new images of a patient the store already holds in another split (a leak between splits).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import DataError, StoreError

log = logging.getLogger(__name__)


def appending_path(out: Path) -> Path:
    return out.with_name(out.name + ".appending")


def _new_rows(store: Any, part: Any) -> np.ndarray:
    """Rows of ``part`` whose image the store does not hold; refuses split leaks."""
    stored = set(map(str, store.image_id))
    new = np.array([i for i, name in enumerate(part.image_id) if str(name) not in stored],
                   dtype=np.int64)
    if not len(new):
        return new
    split_of = dict(zip(map(str, store.patient_id), map(str, store.split)))
    for row in new:
        patient, split = str(part.patient_id[row]), str(part.split[row])
        if split_of.get(patient, split) != split:
            raise StoreError(f"image {part.image_id[row]} of patient {patient} would go to "
                             f"{split}, but store {store.path} holds that patient in "
                             f"{split_of[patient]}: a patient's images must share a split "
                             "(fix the split of the new images, e.g. --split-seed)")
    return new


def _combined_rows(store: Any, new_part: Any) -> dict[str, np.ndarray]:
    """The old rows' fields followed by the new images' (paths relative to the store's
    dataset root, so image paths keep working from there)."""
    from cxrembed.encode.output import row_fields
    from cxrembed.store.schema import ROW_FIELDS

    fresh = row_fields(new_part)
    root = store.attrs.get("dataset_root") or str(new_part.root)
    fresh["image_path"] = np.array([os.path.relpath(p, root) if p else "" for p in
                                    new_part.path], dtype=str)
    out = {}
    for name in ROW_FIELDS:
        old = getattr(store, name)
        out[name] = np.concatenate([np.asarray(old), np.asarray(fresh[name], dtype=old.dtype)
                                    if old.dtype.kind != "U" else np.asarray(fresh[name], str)])
    known = fresh.get("label_known")
    known = np.ones_like(fresh["labels"], dtype=np.uint8) if known is None else known
    out["label_known"] = np.concatenate([store.label_known.astype(np.uint8),
                                         np.asarray(known, np.uint8)])
    return out


def _start(out: Path, work: Path, store: Any, new_part: Any, encoder: Any,
           batch_size: int) -> Any:
    """A fresh ``.appending`` store: old rows' fields and vectors, new rows' fields."""
    from cxrembed.store import StoreWriter

    attrs = dict(store.attrs)
    chunk = max(batch_size, -(-int(attrs.get("chunk_rows", 1024)) // batch_size) * batch_size)
    has_text = bool(attrs.get("has_text"))
    text = store.text_embeddings(normalized=False) if has_text else None
    prompts = store.prompts if has_text else None
    distinct = (list(dict.fromkeys(p for pair in prompts.values() for side in pair
                                   for p in side)) if has_text else [])
    keep = {k: v for k, v in attrs.items() if k in (
        "model_name", "weights_source", "weights_sha256", "run", "load_args", "dataset",
        "preprocessing", "dataset_root", "dataset_sources", "selection", "follow_links")}
    if getattr(new_part, "follow_links", False):
        keep["follow_links"] = True
    writer = StoreWriter.create(
        work, rows=_combined_rows(store, new_part), embed_dim=store.embed_dim,
        fingerprint=store.fingerprint, has_head=store.has_head, has_text=has_text,
        batch_size=batch_size, chunk_rows=chunk, prompts=prompts,
        text_embeddings=np.stack([text[p] for p in distinct]) if has_text else None,
        label_names=store.label_names,
        head_label_names=attrs.get("head_label_names") if store.has_head else None,
        attrs={**keep, "appended_to": str(out)})
    writer.copy_rows_from(store.path, len(store))
    return writer


def append_dataset(dataset: Any, out: str | os.PathLike, encoder: Any, *,
                   pixel_cache: Any = None, batch_size: int = 64, limit: int | None = None,
                   splits: Any = None, workers: int = 2, progress: bool = True,
                   skip_bad: bool = False) -> Any:
    """Add the images of ``dataset`` the store ``out`` lacks (see the module doc)."""
    from cxrembed.data.cache import ImageSource
    from cxrembed.encode.pipeline import EncodeResult, _run, select_rows
    from cxrembed.store import EmbeddingStore, StoreWriter, check_same_encoder

    out = Path(out)
    work = appending_path(out)  # locked by encode_dataset for the whole append
    store = EmbeddingStore.open(out)  # refuses an incomplete store: finish it with --resume
    as_opened = _identity(out)
    try:
        if callable(encoder) and not hasattr(encoder, "encode_image"):
            encoder = encoder()
        check_same_encoder(store, encoder, what=(f"store {out}", "the encoder given"))
        labels = list(getattr(dataset, "label_names", None) or store.label_names)
        if labels != list(store.label_names):
            raise DataError(f"the new images are labelled {labels}, store {out} "
                            f"{store.label_names}: append images of the same label set")
        part = dataset.subset(select_rows(dataset, splits, limit))
        new = _new_rows(store, part)
        n_old = len(store)
        if not len(new):
            log.info("store %s already holds every selected image", out)
            return EncodeResult(out, None, n_old, 0, n_old, 0.0, 0.0)
        new_part = part.subset(new)
        if work.exists():
            writer = StoreWriter.resume(work, fingerprint=encoder.fingerprint)
            ids = writer.column("image_id")
            if (len(ids) != n_old + len(new) or list(ids[:n_old]) != list(store.image_id)
                    or list(ids[n_old:]) != list(map(str, new_part.image_id))):
                writer.close()
                log.warning("%s was started for other images: starting it again", work)
                work.unlink()
        if not work.exists():
            writer = _start(out, work, store, new_part, encoder, batch_size)
        source_rows = np.concatenate([np.full(n_old, -1, np.int64), np.arange(len(new))])
        source = ImageSource(new_part, cache_path=pixel_cache)
    finally:
        store.close()
    result = _run(writer, source, source_rows, encoder, work, writer.batch_size, workers,
                  None, progress, skip_bad)
    index = _swap_in(out, work, n_old, as_opened)
    result.store, result.index, result.resumed_from = out, index, max(result.resumed_from, n_old)
    return result


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _swap_in(out: Path, work: Path, n_old: int, as_opened: tuple[int, int, int]
             ) -> Path | None:
    """The finished ``.appending`` store replaces ``out``; its index grows by the new rows.
    Only here is ``out``'s writer lock taken (searches ran on it until now), and ``out``
    must still be the store the append started from."""
    from cxrembed.store import extend_index, index_path
    from cxrembed.store.lock import store_lock

    with store_lock(out, "cxrembed encode --append (replacing the store)"):
        if not out.is_file() or _identity(out) != as_opened:
            work.unlink(missing_ok=True)  # a copy of a store that is no longer there
            raise StoreError(f"store {out} was changed by another command while new images "
                             "were appended to a copy of it: nothing was replaced; run the "
                             "same `cxrembed encode --append` again to append to the store "
                             "as it is now")
        had_index = index_path(out).is_file()
        prepared = extend_index(index_path(out), work, n_old) if had_index else None
        os.replace(work, out)
        if prepared is not None:
            prepared.commit(index_path(out))
            return index_path(out)
    return None
