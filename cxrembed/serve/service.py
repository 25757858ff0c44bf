"""The store as a long-lived service: opened once, queried many times.

:class:`StoreService` holds what ``cxrembed search`` loads for every call (the store's
metadata, its FAISS index, and its encoder, loaded on the first query that needs it) and
answers queries through :mod:`cxrembed.search`, so a query gives exactly what the command
gives. It knows nothing of HTTP: :mod:`cxrembed.serve.app` maps it onto routes.

Uploaded bytes are checked (size, PNG/JPEG/DICOM signature) before anything decodes them, and
are written to a private temporary folder under a sanitised name so they go through the
same decoding as ``cxrembed search --image``. Thumbnails are served for stored ids only:
the path is the store's record of the image, never one from the client.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxrembed.errors import ConfigError, DataError, StoreError
from cxrembed.search import (Query, query_dict, query_vector, search_query, stored_image_path,
                             usable_index)
from cxrembed.store.centring import resolve_centring
from cxrembed.store import EmbeddingStore, LoadedIndex, has_index, load_index

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
#: The first bytes of the file kinds accepted as uploads (DICOM: ``DICM`` at byte 128).
SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff"}
#: File name suffixes kept for each kind (the decoder tells DICOM by suffix or magic).
SUFFIXES = {".png": (".png",), ".jpg": (".jpg", ".jpeg"), ".dcm": (".dcm", ".dicom")}


class UnknownImage(StoreError):
    """An image id that is not in the store (HTTP 404)."""


class ImageMissing(DataError):
    """A stored image whose file is not where the store says (HTTP 404)."""


class UploadTooLarge(DataError):
    """An upload over the size limit (HTTP 413)."""


class NotAnImage(DataError):
    """An upload that is not a PNG, JPEG or DICOM (HTTP 415)."""


@dataclass
class ServeLimits:
    """What one request may ask for."""

    max_upload_bytes: int = 32 * 2**20  # a 16-bit NIH PNG is ~3 MiB; DICOMs run to ~30
    max_k: int = 200  # neighbours per query
    thumb_size: int = 256  # px, square (centre crop, as the encoder sees the image)
    thumb_cache: int = 512  # thumbnails kept encoded in memory


class StoreService:
    """One store, its index and its encoder, for many queries (thread-safe).

    Args:
        store: the ``.h5`` store (``cxrembed encode``).
        data_root: where the stored images lie now (thumbnails); default: where encoded.
        index: ``auto`` (the saved index when usable, else an exact scan) | ``index`` |
            ``exact``, as ``cxrembed search --index``.
        centre: ``auto`` | ``on`` | ``off``, as ``cxrembed search --centre``: resolved
            once, for every query.
        predictor: an object with ``describe()`` and ``predict_file(path)`` (see
            :mod:`cxrembed.serve.predict`), or None.
        device: where the encoder runs.
        search_threads: OpenMP threads of one FAISS search (None: FAISS's default).
            Requests are answered in parallel threads, so the server uses 1: N
            concurrent searches then use N threads, not N x cores spinning ones
            (measured on a loaded 2-core machine: 65 ms with 1 thread, 216 ms with 2).
    """

    def __init__(self, store: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                 index: str = "auto", centre: str = "auto", predictor: Any = None,
                 device: str = "cpu", limits: ServeLimits | None = None,
                 search_threads: int | None = 1) -> None:
        self.store = EmbeddingStore.open(store)
        self.device = device
        self.search_threads = search_threads
        self.limits = limits or ServeLimits()
        self.index_choice = index
        self.loaded_index: LoadedIndex | None = None
        try:
            self.centring = resolve_centring(self.store, centre)
            if index == "index" or (index == "auto" and has_index(self.store.path)):
                # a broken or stale index is an error, as for `cxrembed search`
                self.loaded_index = usable_index(self.store, load_index(self.store),
                                                 self.centring, index)
                if self.loaded_index is None:  # the other space: exact scans
                    self.index_choice = "exact"
                else:
                    from cxrembed.serve.prefilter import bounded

                    # a pruned exact scan: same hits, bit for bit (serve/prefilter.py)
                    prompts = (self.centring.apply(np.stack(list(
                        self.store.text_embeddings().values())))
                        if self.store.has_text else None)
                    self.loaded_index.front = bounded(self.loaded_index.index,
                                                      known_queries=prompts)
            elif index == "auto":
                log.warning("no index beside %s: queries scan the whole store (slower); "
                            "build one with `cxrembed index`", self.store.path)
        except BaseException:
            self.store.close()
            raise
        self.data_root = Path(data_root or self.store.attrs.get("dataset_root") or ".")
        self.predictor = predictor
        self._encoder: Any = None
        self._encoder_lock = threading.Lock()
        # One encoder forward at a time: each already uses every core (torch threads), and
        # concurrent ones only oversubscribe them.
        self._forward_lock = threading.Lock()
        self._stored_prompts = set(self.store.text_embeddings()) if self.store.has_text else set()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    # ---------------------------------------------------------------------------------
    # Facts

    def summary(self) -> dict:
        """What the page shows about the store and what it can be asked."""
        store = self.store
        splits, counts = np.unique(store.split, return_counts=True)
        info = self.loaded_index.info if self.loaded_index else None
        return {
            "store": store.path.name, "images": len(store),
            "patients": int(len(np.unique(store.patient_id))),
            "splits": {str(s): int(c) for s, c in zip(splits, counts)},
            "model": store.attrs.get("model_name"), "embed_dim": store.embed_dim,
            "run": store.run, "text_queries": store.has_text,
            "index": {"kind": info.kind, "params": info.params} if info else
            {"kind": "exact scan", "params": {}},
            "centring": self.centring.to_dict(),
            "labels": store.label_names,
            "examples": [str(i) for i in store.image_id[:: max(1, len(store) // 6)][:6]],
            "encoder_loaded": self._encoder is not None,
            "predictor": self.predictor.describe() if self.predictor else None,
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes,
                       "max_k": self.limits.max_k},
        }

    def encoder(self) -> Any:
        """The store's encoder, loaded on first use and kept."""
        with self._encoder_lock:
            if self._encoder is None:
                log.info("loading the encoder of %s", self.store.path)
                self._encoder = self.store.encoder(device=self.device)
            return self._encoder

    # ---------------------------------------------------------------------------------
    # Queries

    def search(self, *, image_id: str | None = None, text: str | None = None, k: int = 10,
               split: str | None = None, exclude_same_patient: bool = False) -> dict:
        """Neighbours of a stored id or a text: ``{"query": ..., "hits": [...]}``; the hits
        equal ``cxrembed search --json`` for the same options."""
        if (image_id is None) == (text is None):
            raise ConfigError("give exactly one query: id=ID or text=TEXT (or POST an image)")
        if image_id is not None:
            self._row(image_id)
        if text is not None and text not in self._stored_prompts and text.strip():
            encoder = self.encoder()
            with self._forward_lock:
                query = query_vector(self.store, text=text, encoder=encoder)
        else:
            query = query_vector(self.store, image_id=image_id, text=text)
        return self._answer(query, k, split, exclude_same_patient)

    def search_image(self, data: bytes, filename: str | None = None, *, k: int = 10,
                     split: str | None = None, exclude_same_patient: bool = False) -> dict:
        """Neighbours of an uploaded PNG/JPEG/DICOM, encoded with the store's encoder. A file name
        that is a stored id (or an NIH name) identifies the query image and its patient,
        as ``cxrembed search --image`` does."""
        with self.uploaded(data, filename) as path:
            encoder = self.encoder()
            with _named_errors(path), self._forward_lock:
                query = query_vector(self.store, image=path, encoder=encoder)
        query.value = path.name
        return self._answer(query, k, split, exclude_same_patient)

    def predict_image(self, data: bytes, filename: str | None = None) -> dict:
        """The loaded head's scores (and thresholds) for an uploaded image."""
        if self.predictor is None:
            raise ConfigError("no head is loaded: start the server with --head HEAD_DIR|RUN")
        with self.uploaded(data, filename) as path, _named_errors(path), self._forward_lock:
            return self.predictor.predict_file(path)

    def _answer(self, query: Query, k: int, split: str | None,
                exclude_same_patient: bool) -> dict:
        if split is not None and split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if not 1 <= k <= min(self.limits.max_k, len(self.store)):
            raise ConfigError(f"k={k}: must be between 1 and "
                              f"{min(self.limits.max_k, len(self.store))}")
        if self.search_threads:
            import faiss

            faiss.omp_set_num_threads(self.search_threads)  # per calling thread in OpenMP
        hits = search_query(self.store, query, k, split=split,
                            exclude_same_patient=exclude_same_patient,
                            index=self.index_choice, loaded_index=self.loaded_index,
                            centre=self.centring)
        return {"query": query_dict(query), "centring": self.centring.to_dict(),
                "hits": [hit.to_dict() for hit in hits]}

    def _row(self, image_id: str) -> int:
        try:
            return self.store.row_of(image_id)
        except StoreError:
            raise UnknownImage(f"image {image_id!r} is not in store {self.store.path.name} "
                               f"({len(self.store):,} images)") from None

    # ---------------------------------------------------------------------------------
    # Uploads and thumbnails

    def check_upload(self, data: bytes, filename: str | None) -> str:
        """The file suffix of an acceptable upload (PNG, JPEG, DICOM); UploadTooLarge or
        NotAnImage otherwise."""
        limit = self.limits.max_upload_bytes
        if len(data) > limit:
            raise UploadTooLarge(f"upload {filename or ''} is {len(data):,} bytes; the limit "
                                 f"is {limit:,} (start the server with a larger "
                                 "--max-upload-mb)")
        for suffix, signature in SIGNATURES.items():
            if data.startswith(signature):
                return suffix
        if data[128:132] == b"DICM":
            return ".dcm"
        raise NotAnImage(f"upload {filename or '(no name)'} is not a PNG, JPEG or DICOM image "
                         f"(first bytes {data[:8]!r})")

    def uploaded(self, data: bytes, filename: str | None) -> "_Upload":
        """A context giving the upload as a file in a private temporary folder."""
        return _Upload(data, filename, self.check_upload(data, filename))

    def thumbnail(self, image_id: str) -> bytes:
        """A PNG thumbnail of a stored image (UnknownImage / ImageMissing otherwise)."""
        row = self._row(image_id)
        with self._thumbs_lock:
            if row in self._thumbs:
                self._thumbs.move_to_end(row)
                return self._thumbs[row]
        png = self._make_thumbnail(row)
        with self._thumbs_lock:
            self._thumbs[row] = png
            while len(self._thumbs) > self.limits.thumb_cache:
                self._thumbs.popitem(last=False)
        return png

    def _make_thumbnail(self, row: int) -> bytes:
        import cv2

        from cxrembed.data.images import decode

        path = stored_image_path(self.store, row, self.data_root)
        if path is None:
            raise ImageMissing(f"the image of {self.store.image_id[row]} is not under "
                               f"{self.data_root} (start the server with --data FOLDER)")
        ok, buf = cv2.imencode(".png", decode(path, size=self.limits.thumb_size))
        if not ok:  # pragma: no cover - encoding a uint8 array does not fail
            raise DataError(f"cannot make a thumbnail of {path}")
        return buf.tobytes()

    def close(self) -> None:
        self.store.close()


@contextmanager
def _named_errors(path: Path) -> Iterator[None]:
    """A decoding error names the upload, not its temporary file."""
    try:
        yield
    except DataError as exc:
        raise DataError(str(exc).replace(str(path), path.name)
                        .replace("re-download it or drop it from the lists",
                                 "send a complete PNG or JPEG")) from None


class _Upload:
    """``with`` an upload written as ``NAME`` in a new private folder, removed after."""

    def __init__(self, data: bytes, filename: str | None, suffix: str) -> None:
        name = Path(filename or "").name
        if not _SAFE_NAME.match(name) or Path(name).suffix.lower() not in SUFFIXES[suffix]:
            name = "upload" + suffix  # the decoder goes by the content's own kind
        self.data, self.name = data, name
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        self._folder = tempfile.TemporaryDirectory(prefix="cxrembed-upload-")
        path = Path(self._folder.name) / self.name
        path.write_bytes(self.data)
        return path

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            self._folder.cleanup()
