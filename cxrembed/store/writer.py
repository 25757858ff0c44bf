"""Writing a store in chunks that survive ``kill -9`` and a full disk (schema: ``schema.py``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import StoreError
from cxrembed.files import atomic_write_text, check_space, disk_full_error, is_disk_full
from cxrembed.labels import LABELS
from cxrembed.store.create import check_rows, now, write_new_store
from cxrembed.store.lock import acquire, holding_lock, release
from cxrembed.store.schema import (FORMAT, FORMAT_VERSION, JSON_ATTRS, LABEL_KNOWN,
                                   READABLE_VERSIONS, ROW_FIELDS, decode_strings,
                                   encode_strings, read_attrs)
from cxrembed.store.validate import check_store

log = logging.getLogger(__name__)


def _open_h5(path: Path) -> Any:
    import h5py

    return h5py.File(path, "r+")


def _sidecar(path: Path) -> Path:
    """``STORE.h5.skipped.json``: rows skipped so far by an unfinished encode, and why."""
    return path.with_name(path.name + ".skipped.json")


def _read_sidecar(path: Path, rows_done: int) -> dict[int, str]:
    try:
        raw = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {_sidecar(path)}: {exc}; pass --overwrite to encode "
                         "again") from None
    return {int(row): why for row, why in raw.items() if int(row) < rows_done}


def _write_sidecar(path: Path, skipped: dict[int, str]) -> None:
    atomic_write_text(_sidecar(path),
                      json.dumps({str(r): why for r, why in sorted(skipped.items())}, indent=1))


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
        self._locked = True  # _open_rw took the writer lock; close() gives it back
        self.num_rows = int(h5file.attrs["num_rows"])
        self.embed_dim = int(h5file.attrs["embed_dim"])
        self.chunk_rows = int(h5file.attrs["chunk_rows"])
        self.batch_size = int(h5file.attrs["batch_size"])
        self.has_head = bool(h5file.attrs["has_head"])
        self.num_classes = int(h5file["head_logits"].shape[1]) if self.has_head else 0
        self.rows_done = int(h5file["rows_done"][0])
        self._buffer_emb: list[np.ndarray] = []
        self._buffer_logits: list[np.ndarray] = []
        self._buffered = 0
        #: store row -> why it was skipped (rows below ``rows_done`` are on disk, in the
        #: ``.skipped.json`` sidecar until :meth:`finish` drops them from the store)
        self.skipped: dict[int, str] = _read_sidecar(path, self.rows_done)
        self._pending_skips: dict[int, str] = {}

    # ---------------------------------------------------------------------------------
    # Opening

    @classmethod
    @holding_lock("path", "cxrembed store writer")  # taken before the file is replaced
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
        path = Path(path)
        n = len(rows["image_id"])
        label_names = list(label_names or LABELS)
        head_label_names = list(head_label_names or LABELS)
        known = check_rows(rows, label_names, batch_size, chunk_rows)
        tmp = path.with_name(path.name + ".creating")
        # The vectors alone (a lower bound): a store that cannot fit is refused unwritten.
        per_row = embed_dim * 2 + 4 + (4 * len(head_label_names) if has_head else 0)
        check_space(path, n * per_row, f"a store of {n:,} rows")
        try:
            write_new_store(tmp, rows=rows, known=known, embed_dim=embed_dim,
                            fingerprint=fingerprint, has_head=has_head, has_text=has_text,
                            batch_size=batch_size, chunk_rows=chunk_rows, prompts=prompts,
                            text_embeddings=text_embeddings, attrs=attrs,
                            label_names=label_names, head_label_names=head_label_names)
            _sidecar(path).unlink(missing_ok=True)
            # Only a fully created file takes the store's name: a kill during creation
            # leaves a stray ``.creating`` file, never a half-made store.
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # h5py reports some failed writes as RuntimeError
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(path, exc, "no store was created") from exc
            if isinstance(exc, RuntimeError):
                raise
            raise StoreError(f"cannot create store {path}: {exc}") from exc
        return cls._open_rw(path)

    @classmethod
    def resume(cls, path: str | os.PathLike, *, fingerprint: dict,
               image_id: np.ndarray | None = None) -> "StoreWriter":
        """Reopen an interrupted store to continue at ``rows_done``; refuse another encoder
        (and, when ``image_id`` is given, other images)."""
        from cxrembed.store.fingerprint import check_same_encoder

        path = Path(path)
        writer = cls._open_rw(path)
        try:
            attrs = read_attrs(writer._file.attrs)
            check_same_encoder(attrs.get("fingerprint") or {}, fingerprint,
                               what=(f"store {path}", "the encoder given"))
            stored = writer._file["image_id"][:]
            if image_id is not None and (len(stored) != len(image_id) or not np.array_equal(
                    stored, encode_strings(image_id))):
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
        acquire(path, "cxrembed store writer")  # released by close()
        try:
            f = _open_h5(path)
        except OSError as exc:
            release(path)
            raise StoreError(f"cannot open store {path} for writing: {exc}") from exc
        try:
            if f.attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is not a cxrembed store; choose another --out or "
                                 "pass --overwrite")
            version = read_attrs(f.attrs).get("format_version")
            if version not in READABLE_VERSIONS or isinstance(version, bool):
                raise StoreError(f"store {path} has format version {version!r}; this cxrembed "
                                 f"resumes versions {', '.join(map(str, READABLE_VERSIONS))}: "
                                 "pass --overwrite to encode again")
            check_store(f, read_attrs(f.attrs), path)
            return cls(path, f)
        except BaseException:
            f.close()
            release(path)
            raise

    # ---------------------------------------------------------------------------------
    # Writing

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's attributes, JSON ones parsed."""
        return read_attrs(self._file.attrs)

    def column(self, name: str) -> np.ndarray:
        """A row-aligned metadata field of every row (strings decoded)."""
        data = self._file[name][:]
        return decode_strings(data) if ROW_FIELDS[name] == "S" else data

    @property
    def complete(self) -> bool:
        return bool(self._file.attrs["complete"])

    def append(self, embeddings: np.ndarray, head_logits: np.ndarray | None = None,
               skipped: dict[int, str] | None = None) -> None:
        """Queue the next rows (float32 ``(b, D)``, logits ``(b, C)`` when the store has a
        head); whole chunks are written as they fill.

        ``skipped`` names rows of this batch (store rows) whose image could not be read, and
        why; their vectors should be zeros. They are dropped from the store by
        :meth:`finish` and listed in its ``skipped_images`` attribute.
        """
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
        self._pending_skips.update(skipped or {})
        while self._buffered >= self.chunk_rows:
            self._commit(self.chunk_rows)

    def copy_rows_from(self, source: str | os.PathLike, count: int) -> None:
        """Copy rows ``0 .. count`` of another store's vectors (and logits) as stored, bit
        for bit, and move ``rows_done`` past them (``encode --append``: the old rows)."""
        import h5py

        if self.rows_done or self._buffered:
            raise StoreError(f"store {self.path} already has rows; copy into a new one")
        names = ["embedding", "embedding_norm"] + (["head_logits"] if self.has_head else [])
        with h5py.File(source, "r") as src:
            for start in range(0, count, self.chunk_rows):
                stop = min(count, start + self.chunk_rows)
                for name in names:
                    self._file[name][start:stop] = src[name][start:stop]
        self._file.flush()
        self._file["rows_done"][0] = count
        self._file.flush()
        self.rows_done = count

    def mark_skipped(self, skipped: dict[int, str]) -> None:
        """Drop rows already written (below ``rows_done``) at :meth:`finish`, e.g. images
        no longer in the dataset when an encode is resumed."""
        late = [row for row in skipped if row >= self.rows_done]
        if late:
            raise StoreError(f"row {late[0]} is not written yet; pass it to append()")
        self.skipped.update(skipped)
        _write_sidecar(self.path, self.skipped)

    def flush(self) -> None:
        """Write every buffered row now (the last, partial chunk)."""
        if self._buffered:
            self._commit(self._buffered)

    def finish(self, attrs: dict[str, Any] | None = None) -> None:
        """Write what is buffered, check every row is there, drop skipped rows, record
        ``attrs`` (JSON-able) and set the complete flag."""
        self.flush()
        if self.rows_done != self.num_rows:
            raise StoreError(f"store {self.path} has {self.rows_done} of {self.num_rows} rows; "
                             "finish the encode with --resume")
        try:
            # a resumed version-1 store is finished with version 2's attributes
            self._file.attrs["format_version"] = FORMAT_VERSION
            for key, value in (attrs or {}).items():
                self._file.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
            if self.skipped:
                from cxrembed.store.compact import drop_rows

                self._file.flush()
                self._file.close()
                self._file = None
                drop_rows(self.path, self.skipped, finished=now())
                self._file = _open_h5(self.path)
                _sidecar(self.path).unlink(missing_ok=True)
                return
            self._file.attrs["finished"] = now()
            self._file.attrs["complete"] = True
            self._file.flush()
        except OSError as exc:
            raise StoreError(f"cannot mark store {self.path} complete: {exc}; free disk "
                             "space and rerun with --resume") from exc

    def read_unit_vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit vectors of written rows (ascending), for health figures."""
        rows = np.asarray(rows, dtype=np.int64)
        x = self._file["embedding"][rows].astype(np.float32)
        norms = self._file["embedding_norm"][rows]
        return x / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]

    def read_unit_block(self, start: int, stop: int) -> np.ndarray:
        """float32 unit vectors of written rows ``start..stop-1`` (one contiguous read)."""
        x = self._file["embedding"][start:stop].astype(np.float32)
        norms = self._file["embedding_norm"][start:stop]
        return x / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]

    def label_known(self) -> np.ndarray:
        """The mask of known labels of every row (all known in stores without it)."""
        if LABEL_KNOWN in self._file:
            return self._file[LABEL_KNOWN][:].astype(bool)
        return np.ones(self._file["labels"].shape, dtype=bool)

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
        stop = self.rows_done + count
        new_skips = {r: why for r, why in self._pending_skips.items() if r < stop}
        if new_skips:  # recorded before rows_done moves past them
            self.skipped.update(new_skips)
            _write_sidecar(self.path, self.skipped)
            for row in new_skips:
                del self._pending_skips[row]
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
        """Close the file and give back the writer lock; buffered rows that did not fill a
        chunk are dropped."""
        self._buffer_emb, self._buffer_logits, self._buffered = [], [], 0
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:  # a full disk can fail the final flush: nothing to lose
                log.warning("closing store %s: %s", self.path, exc)
            self._file = None
        if self._locked:
            self._locked = False
            release(self.path)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
