"""Writing a store in chunks that survive ``kill -9`` and a full disk (schema: ``schema.py``)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed import __version__
from cxrembed.errors import StoreError
from cxrembed.labels import LABELS
from cxrembed.store.schema import (FORMAT, FORMAT_VERSION, JSON_ATTRS, LABEL_KNOWN,
                                   ROW_FIELDS, encode_strings, read_attrs)

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _early_dcpl():
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


class StoreWriter:
    """Append embedding rows to a store in order, committing whole chunks.

    Create with :meth:`create` (metadata and text written at once, vectors to come) or
    :meth:`resume`; then :meth:`append` batches in row order and :meth:`finish`. Rows are
    buffered and written ``chunk_rows`` at a time; ``rows_done`` only ever points at the
    end of a flushed chunk, so a resume starts on a chunk (and batch) boundary.
    """

    def __init__(self, path: Path, h5file: Any) -> None:
        self.path = path
        self._file = h5file
        self.num_rows = int(h5file.attrs["num_rows"])
        self.embed_dim = int(h5file.attrs["embed_dim"])
        self.chunk_rows = int(h5file.attrs["chunk_rows"])
        self.batch_size = int(h5file.attrs["batch_size"])
        self.has_head = bool(h5file.attrs["has_head"])
        self.rows_done = int(h5file["rows_done"][0])
        self._buffer_emb: list[np.ndarray] = []
        self._buffer_logits: list[np.ndarray] = []
        self._buffered = 0

    # ---------------------------------------------------------------------------------
    # Opening

    @classmethod
    def create(cls, path: str | os.PathLike, *, rows: dict[str, np.ndarray], embed_dim: int,
               fingerprint: dict, has_head: bool, has_text: bool, batch_size: int,
               chunk_rows: int, prompts: dict[str, tuple[list[str], list[str]]] | None = None,
               text_embeddings: np.ndarray | None = None, attrs: dict[str, Any] | None = None,
               label_names: list[str] | tuple[str, ...] | None = None,
               head_label_names: list[str] | tuple[str, ...] | None = None) -> "StoreWriter":
        """Create ``path`` (replacing nothing: the caller removes an old file first).

        Args:
            rows: every field of :data:`~cxrembed.store.schema.ROW_FIELDS`, row-aligned,
                and optionally ``label_known`` (default: all known).
            fingerprint: the encoder's fingerprint (JSON-able dict).
            chunk_rows: rows per committed chunk; a multiple of ``batch_size``.
            prompts, text_embeddings: the class prompts (``{class: (pos, neg)}``) and one
                row per distinct prompt, in first-seen order, when ``has_text``.
            attrs: further file attributes (model name, weights, run, dataset root, ...).
            label_names: the columns of ``rows["labels"]`` (default: NIH's 14);
                ``rows["label_known"]`` may be left out (all known).
            head_label_names: the columns of the head's logits (default: NIH's 14).
        """
        import h5py

        path = Path(path)
        n = len(rows["image_id"])
        if chunk_rows % batch_size:
            raise StoreError(f"chunk_rows {chunk_rows} is not a multiple of batch_size "
                             f"{batch_size}")
        label_names = list(label_names or LABELS)
        head_label_names = list(head_label_names or LABELS)
        known = rows.get(LABEL_KNOWN)
        known = np.ones((n, len(label_names)), np.uint8) if known is None else known
        missing = set(ROW_FIELDS) - set(rows)
        if missing:
            raise StoreError(f"row fields missing for the store: {', '.join(sorted(missing))}")
        for name, value in (("labels", rows["labels"]), (LABEL_KNOWN, known)):
            if np.shape(value) != (n, len(label_names)):
                raise StoreError(f"{name} must be ({n}, {len(label_names)}) for "
                                 f"{len(label_names)} label names, got {np.shape(value)}")
        tmp = path.with_name(path.name + ".creating")
        try:
            with h5py.File(tmp, "w") as f:
                base = {
                    "format": FORMAT, "format_version": FORMAT_VERSION,
                    "cxrembed_version": __version__, "uuid": uuid.uuid4().hex,
                    "created": _now(), "finished": "", "complete": False, "num_rows": n,
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
                    f.create_dataset(name, data=data, dcpl=_early_dcpl())
                f.create_dataset(LABEL_KNOWN, data=np.asarray(known, dtype="u1"),
                                 dcpl=_early_dcpl())
                dcpl = _early_dcpl()
                f.create_dataset("embedding", shape=(n, embed_dim), dtype="f2", dcpl=dcpl)
                f.create_dataset("embedding_norm", shape=(n,), dtype="f4", dcpl=dcpl)
                if has_head:
                    f.attrs["head_label_names"] = json.dumps(head_label_names)
                    f.create_dataset("head_logits", shape=(n, len(head_label_names)),
                                     dtype="f4", dcpl=dcpl)
                f.create_dataset("rows_done", data=np.zeros(1, np.int64), dcpl=dcpl)
                if has_text:
                    if prompts is None or text_embeddings is None:
                        raise StoreError("a store with a text tower needs its prompts and "
                                         "their text embeddings")
                    group = f.create_group("text")
                    group.attrs["prompts"] = json.dumps(
                        {c: [list(p), list(q)] for c, (p, q) in prompts.items()})
                    distinct = list(dict.fromkeys(p for pair in prompts.values()
                                                  for side in pair for p in side))
                    if len(distinct) != len(text_embeddings):
                        raise StoreError(f"{len(distinct)} distinct prompts but "
                                         f"{len(text_embeddings)} text embeddings")
                    group.create_dataset("prompt", data=np.array(distinct, dtype=object),
                                         dtype=h5py.string_dtype())
                    group.create_dataset("embedding",
                                         data=np.asarray(text_embeddings, dtype=np.float32))
            # Only a fully created file takes the store's name: a kill during creation
            # leaves a stray ``.creating`` file, never a half-made store.
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot create store {path}: {exc}") from exc
        return cls._open_rw(path)

    @classmethod
    def resume(cls, path: str | os.PathLike, *, image_id: np.ndarray, fingerprint: dict
               ) -> "StoreWriter":
        """Reopen an interrupted store to continue; refuse one of other images or encoder."""
        from cxrembed.store.reader import check_same_encoder

        path = Path(path)
        writer = cls._open_rw(path)
        try:
            attrs = read_attrs(writer._file.attrs)
            check_same_encoder(attrs.get("fingerprint") or {}, fingerprint,
                               what=(f"store {path}", "the encoder given"))
            stored = writer._file["image_id"][:]
            if len(stored) != len(image_id) or not np.array_equal(stored,
                                                                   encode_strings(image_id)):
                raise StoreError(
                    f"store {path} was started on other images ({len(stored)} rows; this "
                    f"encode selects {len(image_id)}); resume with the same data, --split and "
                    "--limit, or pass --overwrite to start again")
        except BaseException:
            writer.close()
            raise
        return writer

    @classmethod
    def _open_rw(cls, path: Path) -> "StoreWriter":
        import h5py

        try:
            f = h5py.File(path, "r+")
        except OSError as exc:
            raise StoreError(f"cannot open store {path} for writing: {exc}") from exc
        try:
            if f.attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is not a cxrembed store; choose another --out or "
                                 "pass --overwrite")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise StoreError(f"store {path} has format version {version}; this cxrembed "
                                 f"writes version {FORMAT_VERSION}: pass --overwrite to encode "
                                 "again")
            return cls(path, f)
        except BaseException:
            f.close()
            raise

    # ---------------------------------------------------------------------------------
    # Writing

    @property
    def complete(self) -> bool:
        return bool(self._file.attrs["complete"])

    def append(self, embeddings: np.ndarray, head_logits: np.ndarray | None = None) -> None:
        """Queue the next rows (float32 ``(b, D)``, logits ``(b, 14)`` when the store has a
        head); whole chunks are written as they fill."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise StoreError(f"embeddings of shape {embeddings.shape}; the store holds "
                             f"{self.embed_dim}-d vectors")
        if self.has_head:
            if head_logits is None or len(head_logits) != len(embeddings):
                raise StoreError("this store holds head logits: pass them with every batch")
            self._buffer_logits.append(np.asarray(head_logits, dtype=np.float32))
        if self.rows_done + self._buffered + len(embeddings) > self.num_rows:
            raise StoreError(f"more rows than the store's {self.num_rows}")
        self._buffer_emb.append(embeddings)
        self._buffered += len(embeddings)
        while self._buffered >= self.chunk_rows:
            self._commit(self.chunk_rows)

    def finish(self) -> None:
        """Write what is buffered, check every row is there, and set the complete flag."""
        if self._buffered:
            self._commit(self._buffered)
        if self.rows_done != self.num_rows:
            raise StoreError(f"store {self.path} has {self.rows_done} of {self.num_rows} rows; "
                             "finish the encode with --resume")
        try:
            self._file.attrs["finished"] = _now()
            self._file.attrs["complete"] = True
            self._file.flush()
        except OSError as exc:
            raise StoreError(f"cannot mark store {self.path} complete: {exc}; free disk "
                             "space and rerun with --resume") from exc

    def _commit(self, count: int) -> None:
        emb = np.concatenate(self._buffer_emb)
        rest_emb = emb[count:]
        self._buffer_emb = [rest_emb] if len(rest_emb) else []
        logits = rest_logits = None
        if self.has_head:
            logits = np.concatenate(self._buffer_logits)
            rest_logits = logits[count:]
            self._buffer_logits = [rest_logits] if len(rest_logits) else []
            logits = logits[:count]
        self._buffered -= count
        self._write_chunk(self.rows_done, emb[:count], logits)

    def _write_chunk(self, start: int, embeddings: np.ndarray,
                     head_logits: np.ndarray | None) -> None:
        """Write rows ``start ..`` and then move ``rows_done`` past them (two flushes)."""
        stop = start + len(embeddings)
        with np.errstate(over="ignore"):  # overflow is reported just below, by row
            half = embeddings.astype(np.float16)
        if not np.isfinite(half).all():
            bad = start + int(np.flatnonzero(~np.isfinite(half).all(axis=1))[0])
            raise StoreError(f"row {bad} of {self.path}: the encoder returned a non-finite "
                             "vector or one beyond float16 range")
        norms = np.linalg.norm(half.astype(np.float32), axis=1)
        try:
            self._file["embedding"][start:stop] = half
            self._file["embedding_norm"][start:stop] = norms
            if head_logits is not None:
                self._file["head_logits"][start:stop] = head_logits
            self._file.flush()  # the rows reach the file before the counter says so
            self._file["rows_done"][0] = stop
            self._file.flush()
        except OSError as exc:
            raise StoreError(
                f"writing rows {start}-{stop - 1} of store {self.path} failed: {exc}. The "
                f"first {self.rows_done} rows are kept; free disk space and rerun the same "
                "command with --resume") from exc
        self.rows_done = stop
        log.debug("store %s: %d of %d rows", self.path, stop, self.num_rows)

    def close(self) -> None:
        """Close the file; buffered rows that did not fill a chunk are dropped."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:  # a full disk can fail the final flush: nothing to lose
                log.warning("closing store %s: %s", self.path, exc)
            self._file = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
