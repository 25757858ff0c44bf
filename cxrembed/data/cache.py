"""The pixel cache: every image decoded once to 224×224 uint8, row-aligned with the index.

At NIH size the cache is 112,120 × 224 × 224 bytes ≈ 5.6 GB and takes PNG decoding out of
every epoch and every encode. Layout of ``pixels.h5``::

    /pixels     uint8 (N, S, S), contiguous (fast slicing, no chunk index)
    /image_id   str (N,)        the dataset's image names, in its row order
    /done       bool (N,)       rows written; set only after their pixels are flushed
    attrs       format, size, decoder, preprocessing (JSON), complete

A build killed at any point (Ctrl-C, ``kill -9``) resumes where it stopped: rows whose
``done`` flag is set are never decoded again, and the finished file has exactly the bytes
an uninterrupted build writes.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cxrembed.data.images import IMAGE_SIZE, PREPROCESSING, decode
from cxrembed.data.nih import NIHDataset
from cxrembed.errors import DataError
from cxrembed.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
BLOCK = 256  # rows decoded per task and flushed together


def _decode_block(job: tuple[int, list[str], int, str]) -> tuple[int, np.ndarray]:
    start, paths, size, decoder = job
    return start, np.stack([decode(p, size=size, decoder=decoder) for p in paths])


def build_pixel_cache(dataset: NIHDataset, out: str | os.PathLike, *, size: int = IMAGE_SIZE,
                      decoder: str = "opencv", workers: int | None = None,
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Decode every image of ``dataset`` into ``out`` (resuming a partial build).

    Args:
        workers: decoding processes (default: all cores; 0 decodes in this process).
        overwrite: start again when ``out`` holds a cache of other images or settings;
            without it, such a file is refused rather than destroyed.
    Returns the cache path. Rows already done in an earlier, interrupted build are kept.
    """
    import h5py

    out = Path(out)
    if not dataset.present.all():
        absent = dataset.image_id[~dataset.present]
        raise DataError(f"{len(absent)} images of the dataset are not on disk (first: "
                        f"{', '.join(absent[:5])}); load it with --allow-missing to cache the rest")
    n = len(dataset)
    ids = dataset.image_id.astype(str)
    mode = "a" if out.exists() and not overwrite else "w"
    if mode == "a":
        try:
            with h5py.File(out, "r") as f:
                same = (f.attrs.get("size") == size and f.attrs.get("decoder") == decoder
                        and f["image_id"].shape == (n,)
                        and np.array_equal(f["image_id"].asstr()[:], ids))
        except (OSError, KeyError) as exc:
            raise DataError(f"{out} exists but is not a readable pixel cache ({exc}); "
                            "pass --overwrite to replace it") from None
        if not same:
            raise DataError(f"{out} holds a pixel cache of other images or settings; pass "
                            "--overwrite to replace it, or choose another --out")
    workers = (os.cpu_count() or 1) if workers is None else workers
    # Workers start before the file is opened, so that none of them inherits its handle
    # (and its lock): after a kill -9 the rerun can open the file at once.
    with _pool(workers) as pool, h5py.File(out, mode) as f:
        if mode == "w":
            f.attrs.update(format=CACHE_FORMAT, size=size, decoder=decoder,
                           preprocessing=json.dumps(PREPROCESSING), complete=False)
            f.create_dataset("image_id", data=ids.astype(object), dtype=h5py.string_dtype())
            f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
            f.create_dataset("pixels", shape=(n, size, size), dtype=np.uint8)
            f.flush()
        done = f["done"][:]
        todo = np.flatnonzero(~done)
        if len(todo) < n:
            log.info("resuming: %d of %d rows already cached", n - len(todo), n)
        # Blocks of consecutive rows still to do (a resumed build has holes).
        blocks = [todo[i:i + BLOCK] for i in range(0, len(todo), BLOCK)]
        jobs = [(int(b[0]), list(dataset.path[b]), size, decoder) for b in blocks]
        pixels, flags = f["pixels"], f["done"]
        with progress_bar(n, "caching pixels", enabled=progress) as advance:
            advance(n - len(todo))
            for block, (_, arr) in zip(blocks, pool.map(_decode_block, jobs)):
                _write_rows(pixels, block, arr)
                f.flush()  # pixels reach the file before their done flags
                _write_rows(flags, block, np.ones(len(block), dtype=bool))
                f.flush()
                advance(len(block))
        f.attrs["complete"] = True
    log.info("pixel cache of %d images at %s", n, out)
    return out


class _InProcess:
    """A stand-in for a process pool when workers=0 (debugging, tiny datasets)."""

    map = staticmethod(map)

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _die_with_parent() -> None:
    """Worker initializer: on Linux, end this worker when the parent dies (even by kill -9),
    instead of leaving an orphan behind."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _pool(workers: int):
    if workers == 0:
        return _InProcess()
    # The platform's default start method: workers need only numpy + OpenCV, and (unlike
    # spawn) a user's script without an `if __name__ == "__main__"` guard still works.
    pool = ProcessPoolExecutor(workers, initializer=_die_with_parent)
    list(pool.map(abs, range(workers)))  # start every worker now (fork starts them all)
    return pool


def _contiguous(rows: np.ndarray) -> bool:
    return rows[-1] - rows[0] + 1 == len(rows)


def _write_rows(dset, rows: np.ndarray, arr: np.ndarray) -> None:
    if _contiguous(rows):
        dset[rows[0]:rows[-1] + 1] = arr
    else:
        for r, img in zip(rows, arr):
            dset[r] = img


class PixelCache:
    """Read-only access to a pixel cache; rows are looked up by image id."""

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"cannot open pixel cache {self.path}: {exc}; build it with "
                            "`cxrembed cache DATA --out PATH`") from None
        if not self._file.attrs.get("complete", False):
            raise DataError(f"pixel cache {self.path} is incomplete; finish it by running the "
                            "same `cxrembed cache` command again (it resumes)")
        stored = self._file.attrs.get("preprocessing")
        if stored is not None and json.loads(stored) != PREPROCESSING:
            raise DataError(f"pixel cache {self.path} was decoded with other preprocessing "
                            f"({stored}); rebuild it with `cxrembed cache ... --overwrite`")
        self.image_id = self._file["image_id"].asstr()[:]
        self.size = int(self._file.attrs["size"])
        self._pixels = self._file["pixels"]
        self._row = {name: r for r, name in enumerate(self.image_id)}

    def __len__(self) -> int:
        return len(self.image_id)

    def rows_for(self, image_ids: np.ndarray) -> np.ndarray:
        """Cache rows of the given image ids (DataError naming the first that is absent)."""
        try:
            return np.fromiter((self._row[i] for i in image_ids), dtype=np.int64,
                               count=len(image_ids))
        except KeyError as exc:
            raise DataError(f"image {exc.args[0]} is not in pixel cache {self.path}; rebuild "
                            "the cache for this dataset") from None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (k, S, S) pixels of cache rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.size, self.size), np.uint8)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        uniq, inverse = np.unique(sorted_rows, return_inverse=True)
        block = self._pixels[uniq]  # h5py fancy indexing wants increasing indices
        out = np.empty((len(rows), self.size, self.size), np.uint8)
        out[order] = block[inverse]
        return out

    def close(self) -> None:
        self._file.close()

    def __getstate__(self) -> dict:  # reopen in DataLoader workers
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class ImageSource:
    """Images for rows of a dataset: from a pixel cache when given, else decoded PNGs."""

    def __init__(self, dataset: NIHDataset, cache_path: str | os.PathLike | None = None,
                 size: int = IMAGE_SIZE, decoder: str = "opencv") -> None:
        self.dataset, self.size, self.decoder = dataset, size, decoder
        self.cache = PixelCache(cache_path) if cache_path else None
        self._cache_rows = None
        if self.cache is not None:
            if self.cache.size != size:
                raise DataError(f"pixel cache {self.cache.path} holds {self.cache.size}px images, "
                                f"{size}px are needed; rebuild it with --size {size}")
            self._cache_rows = self.cache.rows_for(dataset.image_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (k, size, size) images of dataset rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache is not None:
            return self.cache.read(self._cache_rows[rows])
        return np.stack([decode(self.dataset.path[r], size=self.size, decoder=self.decoder)
                         for r in rows]) if len(rows) else np.zeros((0, self.size, self.size),
                                                                    np.uint8)
