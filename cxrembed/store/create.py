"""A new store's file written at once: its attributes, every row's metadata, the vectors'
space (allocated, filled later by :class:`~cxrembed.store.writer.StoreWriter`) and the
text prompts (schema: ``schema.py``)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed import __version__
from cxrembed.errors import StoreError
from cxrembed.store.schema import FORMAT, FORMAT_VERSION, JSON_ATTRS, LABEL_KNOWN, ROW_FIELDS, \
    encode_strings


def now() -> str:
    """The current UTC time, ISO-8601 to the second (``created`` / ``finished``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def early_dcpl():
    """Contiguous layout, space allocated at creation, no fill writes, no timestamps.

    With this, later writes touch raw data only and never the file's metadata, which is
    what makes a kill at any moment harmless.
    """
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    return dcpl


def check_rows(rows: dict[str, np.ndarray], label_names: list[str], batch_size: int,
               chunk_rows: int) -> np.ndarray:
    """Refuse rows a store cannot be made of; returns the known-labels mask (all known
    when ``rows`` has none)."""
    n = len(rows["image_id"])
    if chunk_rows % batch_size:
        raise StoreError(f"chunk_rows {chunk_rows} is not a multiple of batch_size "
                         f"{batch_size}")
    known = rows.get(LABEL_KNOWN)
    known = np.ones((n, len(label_names)), np.uint8) if known is None else known
    missing = set(ROW_FIELDS) - set(rows)
    if missing:
        raise StoreError(f"row fields missing for the store: {', '.join(sorted(missing))}")
    for name, value in (("labels", rows["labels"]), (LABEL_KNOWN, known)):
        if np.shape(value) != (n, len(label_names)):
            raise StoreError(f"{name} must be ({n}, {len(label_names)}) for "
                             f"{len(label_names)} label names, got {np.shape(value)}")
    return known


def write_new_store(tmp: Path, *, rows: dict[str, np.ndarray], known: np.ndarray,
                    embed_dim: int, fingerprint: dict, has_head: bool, has_text: bool,
                    batch_size: int, chunk_rows: int,
                    prompts: dict[str, tuple[list[str], list[str]]] | None,
                    text_embeddings: np.ndarray | None, attrs: dict[str, Any] | None,
                    label_names: list[str], head_label_names: list[str]) -> None:
    """Write the whole file at ``tmp``, every row's vectors to come (``rows_done`` 0).
    Arguments: see :meth:`StoreWriter.create <cxrembed.store.writer.StoreWriter.create>`."""
    import h5py

    n = len(rows["image_id"])
    with h5py.File(tmp, "w") as f:
        base = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "cxrembed_version": __version__, "uuid": uuid.uuid4().hex,
            "created": now(), "finished": "", "complete": False, "num_rows": n,
            "embed_dim": int(embed_dim), "fingerprint": fingerprint,
            "has_head": bool(has_head), "has_text": bool(has_text),
            "label_names": label_names, "batch_size": int(batch_size),
            "chunk_rows": int(chunk_rows),
        }
        for key, value in {**base, **(attrs or {})}.items():
            if key in JSON_ATTRS:
                value = json.dumps(value)
            f.attrs[key] = "" if value is None else value
        for name, kind in ROW_FIELDS.items():
            data = rows[name]
            data = encode_strings(data) if kind == "S" else np.asarray(data, dtype=kind)
            f.create_dataset(name, data=data, dcpl=early_dcpl())
        f.create_dataset(LABEL_KNOWN, data=np.asarray(known, dtype="u1"), dcpl=early_dcpl())
        dcpl = early_dcpl()
        f.create_dataset("embedding", shape=(n, embed_dim), dtype="f2", dcpl=dcpl)
        f.create_dataset("embedding_norm", shape=(n,), dtype="f4", dcpl=dcpl)
        if has_head:
            f.attrs["head_label_names"] = json.dumps(head_label_names)
            f.create_dataset("head_logits", shape=(n, len(head_label_names)), dtype="f4",
                             dcpl=dcpl)
        f.create_dataset("rows_done", data=np.zeros(1, np.int64), dcpl=dcpl)
        if has_text:
            _write_text(f, prompts, text_embeddings)


def _write_text(f: Any, prompts: dict[str, tuple[list[str], list[str]]] | None,
                text_embeddings: np.ndarray | None) -> None:
    """The ``text`` group: the class prompts and one embedding per distinct prompt."""
    import h5py

    if prompts is None or text_embeddings is None:
        raise StoreError("a store with a text tower needs its prompts and their text "
                         "embeddings")
    group = f.create_group("text")
    group.attrs["prompts"] = json.dumps({c: [list(p), list(q)] for c, (p, q) in prompts.items()})
    distinct = list(dict.fromkeys(p for pair in prompts.values() for side in pair for p in side))
    if len(distinct) != len(text_embeddings):
        raise StoreError(f"{len(distinct)} distinct prompts but {len(text_embeddings)} text "
                         "embeddings")
    group.create_dataset("prompt", data=np.array(distinct, dtype=object),
                         dtype=h5py.string_dtype())
    group.create_dataset("embedding", data=np.asarray(text_embeddings, dtype=np.float32))
