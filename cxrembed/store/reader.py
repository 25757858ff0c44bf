"""Reading a store: metadata in memory, vectors read only for the rows asked for."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.data.splits import SPLITS
from cxrembed.errors import ConfigError, CxrembedError, StoreError
from cxrembed.labels import LABELS, canonical
from cxrembed.store.fingerprint import check_same_encoder
from cxrembed.store.lock import describe_owner, writer_at_work
from cxrembed.store.schema import (FORMAT, LABEL_KNOWN, NO_FINDING_KEY, READABLE_VERSIONS,
                                   ROW_FIELDS, decode_strings, read_attrs)
from cxrembed.store.text import StoreText
from cxrembed.store.validate import check_store

log = logging.getLogger(__name__)

# check_same_encoder lives in .fingerprint; importable from here as before.
__all__ = ["EmbeddingStore", "check_same_encoder"]

#: Rows read per HDF5 slice when gathering scattered rows (bounds the extra memory).
READ_BLOCK = 8192


def _busy(path: Path, writer: dict, cause: Exception) -> StoreError:
    return StoreError(f"store {path} is being written by {describe_owner(writer)} and "
                      f"cannot be read at this moment ({cause}): wait for that encode to "
                      "finish, then run this again")


class EmbeddingStore(StoreText):
    """A read-only store. Metadata arrays (small) are loaded; vectors are read on demand.

    Open with :meth:`open`. Row ``i`` of every array and of :meth:`embeddings` is image
    ``image_id[i]``. An incomplete store opened with ``allow_incomplete`` shows only its
    finished rows.
    """

    def __init__(self, path: Path, h5file: Any, attrs: dict[str, Any], rows: int) -> None:
        self.path = path
        self._file = h5file
        self.attrs = attrs
        self._n = rows
        for name in ROW_FIELDS:
            data = h5file[name][:rows]
            setattr(self, name, decode_strings(data) if ROW_FIELDS[name] == "S" else data)
        #: False where a label is unknown (all True in stores written before the mask).
        self.label_known = (h5file[LABEL_KNOWN][:rows].astype(bool) if LABEL_KNOWN in h5file
                            else np.ones(self.labels.shape, dtype=bool))
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, allow_incomplete: bool = False) -> "EmbeddingStore":
        """Open ``path`` read-only; refuse another format version or an incomplete store."""
        import h5py

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"store {path} does not exist; create it with "
                             "`cxrembed encode DATA --out STORE.h5`")
        writer = writer_at_work(path)
        if writer is not None and not allow_incomplete:
            raise StoreError(f"store {path} is being written by {describe_owner(writer)}: "
                             "wait for that encode to finish, then run this again (from "
                             "Python: EmbeddingStore.open(..., allow_incomplete=True) reads "
                             "the rows final so far)")
        if writer is not None:
            return cls._open_while_written(path, writer)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(f"cannot open store {path}: {exc} (not an HDF5 file, or an "
                             "encode is still writing it)") from None
        return cls._from_file(path, f, allow_incomplete)

    @classmethod
    def _open_while_written(cls, path: Path, writer: dict) -> "EmbeddingStore":
        """The rows final so far of a store another process writes. HDF5's own file lock
        would refuse a reader: the rows below rows_done are final (schema.py), so they are
        read unlocked. What cannot be read now (a header being rewritten, a file being
        replaced) is the writer's doing: said so, not as a damaged store."""
        import h5py

        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as exc:
            raise _busy(path, writer, exc) from None
        try:
            return cls._from_file(path, f, True)
        except (OSError, KeyError, ValueError, StoreError) as exc:
            raise _busy(path, writer, exc) from None

    @classmethod
    def _from_file(cls, path: Path, f: Any, allow_incomplete: bool) -> "EmbeddingStore":
        """Check the open HDF5 file ``f`` and wrap it (closing it on any refusal)."""
        try:
            attrs = read_attrs(f.attrs)
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is an HDF5 file but not a cxrembed store (no "
                                 f"format={FORMAT!r} attribute)")
            version = attrs.get("format_version")
            if version not in READABLE_VERSIONS or isinstance(version, bool):
                raise StoreError(
                    f"store {path} has format version {version!r} (cxrembed "
                    f"{attrs.get('cxrembed_version', '?')} wrote it); this cxrembed reads "
                    f"versions {', '.join(map(str, READABLE_VERSIONS))}: re-encode it with "
                    "`cxrembed encode`, or use the cxrembed version that wrote it")
            done = check_store(f, attrs, path)
            if not attrs.get("complete"):
                if not allow_incomplete:
                    raise StoreError(
                        f"store {path} is incomplete ({done} of {attrs['num_rows']} rows): "
                        "an encode into it stopped before the end; finish it by running "
                        "the same `cxrembed encode` again with --resume (from Python: "
                        "EmbeddingStore.open(..., allow_incomplete=True) uses the finished "
                        "rows)")
                log.warning("store %s is incomplete: using its first %d of %d rows", path,
                            done, attrs["num_rows"])
            return cls(path, f, attrs, done if not attrs.get("complete") else attrs["num_rows"])
        except BaseException:
            f.close()
            raise

    # ---------------------------------------------------------------------------------
    # Facts

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, "
                f"model={self.attrs.get('model_name')!r}, dim={self.embed_dim})")

    @property
    def fingerprint(self) -> dict:
        return self.attrs.get("fingerprint") or {}

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def has_head(self) -> bool:
        return bool(self.attrs.get("has_head"))

    @property
    def has_text(self) -> bool:
        return bool(self.attrs.get("has_text"))

    @property
    def run(self) -> str | None:
        """The adapted run whose encoder (and head) made this store, or None."""
        return self.attrs.get("run") or None

    @property
    def label_names(self) -> list[str]:
        return list(self.attrs.get("label_names") or LABELS)

    @property
    def head_label_names(self) -> list[str]:
        """The columns of the adapted head's logits (NIH's 14 for stores before the attr)."""
        return list(self.attrs.get("head_label_names") or LABELS)

    @property
    def dataset(self) -> str:
        """The reader of the encoded data (``nih`` for stores before the attribute)."""
        return str(self.attrs.get("dataset") or "nih")

    # ---------------------------------------------------------------------------------
    # Rows

    def row_of(self, image_id: str) -> int:
        """The row of a stored image id (StoreError when absent)."""
        if self._row_of is None:
            self._row_of = {name: i for i, name in enumerate(self.image_id)}
        try:
            return self._row_of[image_id]
        except KeyError:
            raise StoreError(f"image {image_id!r} is not in store {self.path} "
                             f"({len(self)} images, e.g. {', '.join(self.image_id[:3])})"
                             ) from None

    def select(self, split: str | None = None, view: str | None = None,
               label: str | None = None) -> np.ndarray:
        """Row indices (int64, ascending) of images matching every filter given.

        ``label`` is a class name (any accepted spelling) for images carrying it, or
        ``"No Finding"`` for images carrying none.
        """
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ConfigError(f"unknown split {split!r}; expected {', '.join(SPLITS)}")
            keep &= self.split == split
        if view is not None:
            views = sorted(set(self.view.tolist()) - {""})
            if view.upper() not in views:
                raise ConfigError(f"unknown view {view!r}; this store has "
                                  f"{', '.join(views) or 'no view values'}")
            keep &= self.view == view.upper()
        if label is not None:
            if label.strip().lower() == NO_FINDING_KEY.lower():
                keep &= (self.labels * self.label_known).sum(axis=1) == 0
            else:
                k = self.label_column(label)
                keep &= (self.labels[:, k] == 1) & self.label_known[:, k]
        return np.flatnonzero(keep)

    def label_column(self, name: str) -> int:
        """Column of a class in ``labels``: its name in the store's own vocabulary (case
        ignored; NIH's CSV spellings too); a ConfigError lists the names there are."""
        lowered = [n.lower() for n in self.label_names]
        key = name.strip().lower().replace("_", " ")
        for candidate in (name.strip().lower(), key):
            if candidate in lowered:
                return lowered.index(candidate)
        try:
            return self.label_names.index(canonical(name))
        except (ValueError, CxrembedError):
            raise ConfigError(f"unknown label {name!r}; store {self.path} has "
                              f"{', '.join(self.label_names)} or {NO_FINDING_KEY!r}") from None

    def _check_rows(self, rows: Any) -> np.ndarray | None:
        if rows is None:
            return None
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ConfigError(f"boolean row mask of shape {rows.shape}; the store has "
                                  f"{len(self)} rows")
            return np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise ConfigError(f"row {bad} is out of range: store {self.path} has {len(self)} "
                              "rows")
        return rows

    def _gather(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        """Rows of a 1-d or 2-d dataset in the order given, reading only the slabs needed."""
        dset = self._file[name]
        if rows is None:
            return dset[:len(self)]
        out = np.empty((len(rows),) + dset.shape[1:], dtype=dset.dtype)
        if not len(rows):
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)
        gathered = np.empty((len(uniq),) + dset.shape[1:], dtype=dset.dtype)
        # One contiguous slab per READ_BLOCK span of rows touched: reads at most
        # READ_BLOCK rows more than asked for at a time, and never the whole file.
        start = 0
        while start < len(uniq):
            first = uniq[start]
            stop = int(np.searchsorted(uniq, first + READ_BLOCK, side="left"))
            last = uniq[stop - 1]
            slab = dset[first:last + 1]
            gathered[start:stop] = slab[uniq[start:stop] - first]
            start = stop
        out[:] = gathered[inverse]
        return out

    def embeddings(self, rows: Any = None, normalized: bool = True) -> np.ndarray:
        """float32 ``(k, D)`` vectors of ``rows`` (None: all), in the order given.

        ``normalized=True`` gives unit vectors (for cosine similarity); False gives the
        encoder's raw joint-space output (the adapted head's input).
        """
        rows = self._check_rows(rows)
        x = self._gather("embedding", rows).astype(np.float32)
        if normalized:
            norms = self._gather("embedding_norm", rows)
            x /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
        return x

    def embeddings_at(self, rows: Any) -> np.ndarray:
        """float32 unit vectors of scattered ``rows`` (re-ranking's candidates), reading
        only those rows, never the span between them as :meth:`embeddings` may.

        A contiguous, uncompressed dataset (what the writer makes) is memory-mapped; any
        other layout (chunked, virtual) is read with h5py's point selection (slower).
        """
        rows = self._check_rows(rows)
        uniq, inverse = np.unique(rows, return_inverse=True)
        x = self._scattered("embedding", uniq).astype(np.float32)
        x /= np.maximum(self._scattered("embedding_norm", uniq),
                        np.finfo(np.float32).tiny)[:, None]
        return x[inverse]

    def _scattered(self, name: str, sorted_rows: np.ndarray) -> np.ndarray:
        maps = self.__dict__.setdefault("_maps", {})
        if name not in maps:
            dset = self._file[name]
            offset = dset.id.get_offset()
            maps[name] = dset if offset is None or dset.chunks is not None else np.memmap(
                self.path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)
        return np.asarray(maps[name][sorted_rows])

    def norms(self, rows: Any = None) -> np.ndarray:
        """float32 L2 norms of the stored raw vectors."""
        return self._gather("embedding_norm", self._check_rows(rows)).astype(np.float32)

    def head_logits(self, rows: Any = None) -> np.ndarray:
        """float32 ``(k, 14)`` adapted-head logits; StoreError when the store has none."""
        if not self.has_head:
            raise StoreError(f"store {self.path} has no adapted-head logits: it was encoded "
                             "with a frozen CLIP; encode with --checkpoint RUN to get them")
        return self._gather("head_logits", self._check_rows(rows)).astype(np.float32)

    # ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.__dict__.pop("_maps", None)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
