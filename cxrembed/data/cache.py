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
from pathlib import Path

import numpy as np

from cxrembed.data.images import IMAGE_SIZE, PREPROCESSING, decode
from cxrembed.data.decode_pool import decode_pool as _pool
from cxrembed.data.nih import NIHDataset
from cxrembed.errors import DataError
from cxrembed.files import atomic_write, check_space, disk_full_error, is_disk_full
from cxrembed.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
BLOCK = 256  # rows decoded per task and flushed together
JOINS = ("virtual", "copy")  # how a sharded build's rank 0 joins (data/cache_shards.py)


def _decode_block(job: tuple[int, list[str], int, str, bool]
                  ) -> tuple[int, np.ndarray, dict[int, str]]:
    """Decode one block; with ``skip_bad`` an unreadable image becomes a black tile and
    ``{offset in block: why}``."""
    start, paths, size, decoder, skip_bad = job
    out = np.zeros((len(paths), size, size), np.uint8)
    bad: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            out[i] = decode(path, size=size, decoder=decoder)
        except DataError as exc:
            if not skip_bad:
                raise
            bad[i] = str(exc)
    return start, out, bad


def _cache_rows(out: Path, ids: np.ndarray, size: int, decoder: str) -> np.ndarray | None:
    """Rows of an existing cache for ``ids`` (None: there is none to resume), refusing a
    cache of other settings or one lacking some of the images."""
    import h5py

    try:
        with h5py.File(out, "r") as f:
            same = f.attrs.get("size") == size and f.attrs.get("decoder") == decoder
            refuse_other_encoding(out, f.attrs)
            cached = f["image_id"].asstr()[:]
    except (OSError, KeyError) as exc:
        raise DataError(f"{out} exists but is not a readable pixel cache ({exc}); "
                        "pass --overwrite to replace it") from None
    if not same:
        raise DataError(f"{out} holds a pixel cache of other settings (size, decoder); pass "
                        "--overwrite to replace it, or choose another --out")
    row = {name: r for r, name in enumerate(cached)}
    absent = [name for name in ids if name not in row]
    if absent:
        raise DataError(f"{out} holds a pixel cache of other images: {len(absent)} image(s) "
                        f"of this dataset are not in it (first: {', '.join(absent[:3])}); pass "
                        "--overwrite to build it again, or choose another --out")
    if len(ids) < len(cached):
        log.info("%d images of cache %s are no longer in the dataset; they stay uncached",
                 len(cached) - len(ids), out)
    return np.fromiter((row[name] for name in ids), np.int64, count=len(ids))


def refuse_other_encoding(path: Path, attrs) -> None:
    """DataError when the cache (or shard) at ``path`` holds pixels of another format or
    preprocessing than this cxrembed writes: resuming or joining it would mix them, or
    stamp them as current."""
    stored = attrs.get("preprocessing")
    current = stored is not None and json.loads(stored) == PREPROCESSING
    if attrs.get("format") != CACHE_FORMAT or not current:
        raise DataError(f"{path} holds pixels decoded with other preprocessing or format "
                        f"({stored}, format {attrs.get('format')}) than this cxrembed's; pass "
                        "--overwrite to decode them again, or choose another --out")


def build_pixel_cache(dataset: NIHDataset, out: str | os.PathLike, *, size: int = IMAGE_SIZE,
                      decoder: str = "opencv", workers: int | None = None,
                      overwrite: bool = False, progress: bool = True,
                      skip_bad: bool = False, join: str = "virtual") -> Path:
    """Decode every image of ``dataset`` into ``out`` (resuming a partial build).

    Args:
        workers: decoding processes (default: all cores; under torchrun, the cores this
            process may use shared among the node's processes; 0 decodes in this process).
        overwrite: start again when ``out`` holds a cache of other images or settings;
            without it, such a file is refused rather than destroyed. A cache holding every
            image of ``dataset`` (and more: images removed since) is resumed.
        skip_bad: record unreadable images (attribute ``skipped``: ``{image_id: why}``)
            instead of stopping at the first; reading them from the cache is refused.
        join: under ``torchrun``, how rank 0 joins the ranks' shards into ``out``:
            ``virtual`` (an HDF5 virtual dataset over the shards, which stay beside it)
            or ``copy`` (one self-contained file); see :mod:`cxrembed.data.cache_shards`.
    Returns the cache path. Rows already done in an earlier, interrupted build are kept.

    Under ``torchrun`` every process calls this with the same arguments: each decodes
    its contiguous share of the rows into a shard, and rank 0 joins them into ``out``.
    """
    from cxrembed.distributed import launch

    out = Path(out)
    _check_dataset(dataset)
    if join not in JOINS:
        raise DataError(f"unknown --join {join!r}; expected one of {', '.join(JOINS)}")
    here = launch()
    if here.distributed:
        from cxrembed.data.cache_shards import build_cache_shards

        return build_cache_shards(dataset, out, here, size=size, decoder=decoder,
                                  workers=workers, overwrite=overwrite, progress=progress,
                                  skip_bad=skip_bad, join=join)
    from cxrembed import sharding

    if overwrite:  # a joined cache goes with its shards, never left pointing at none
        if sharding.all_shards(out):
            out.unlink(missing_ok=True)
        sharding.remove_all_shards(out)
    elif not _is_complete(out):
        sharding.refuse_other_world_shards(out, 1, what="pixel cache", resume="",
                                           error=DataError)
    return build_one_cache(dataset, out, size=size, decoder=decoder, workers=workers,
                           overwrite=overwrite, progress=progress, skip_bad=skip_bad)


def _check_dataset(dataset: NIHDataset) -> None:
    if len(dataset) == 0:
        raise DataError(f"no image to cache: none of the images that the metadata of "
                        f"{dataset.root} names (and the --view chosen keeps) is on disk "
                        f"({len(dataset.missing):,} missing); check the data folder (images "
                        "are looked for in images_*/images/, images/ and the folder itself)")
    if not dataset.present.all():
        absent = dataset.image_id[~dataset.present]
        raise DataError(f"{len(absent)} images of the dataset are not on disk (first: "
                        f"{', '.join(absent[:5])}); load it with --allow-missing to cache the rest")


def _is_complete(out: Path) -> bool:
    import h5py

    try:
        with h5py.File(out, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:  # absent, or not a cache: build_one_cache says which
        return False


def build_one_cache(dataset: NIHDataset, out: Path, *, size: int, decoder: str,
                    workers: int | None, overwrite: bool, progress: bool,
                    skip_bad: bool) -> Path:
    """:func:`build_pixel_cache` in this process alone (also one rank's shard)."""
    n = len(dataset)
    ids = dataset.image_id.astype(str)
    rows = None if overwrite or not out.exists() else _cache_rows(out, ids, size, decoder)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if rows is None:  # under its name only once whole: a rerun after Ctrl-C finds a cache
        check_space(out, n * size * size, f"a pixel cache of {n:,} images")
        atomic_write(out, lambda tmp: _create_file(tmp, ids, size, decoder))
        rows = np.arange(n)
    try:
        _fill(out, dataset, rows, n, size, decoder, skip_bad, workers, progress)
    except (OSError, RuntimeError) as exc:  # h5py reports some failed writes as RuntimeError
        if not is_disk_full(exc):
            raise
        raise disk_full_error(out, exc, "the images cached so far are kept (the same command "
                              "resumes after them)") from exc
    skipped = json.loads(_attr(out, "skipped") or "{}")
    if skipped:
        log.warning("%d unreadable image(s) skipped in cache %s (first: %s)", len(skipped), out,
                    next(iter(skipped.items())))
    log.info("pixel cache of %d images at %s", n, out)
    return out


def _fill(out: Path, dataset: NIHDataset, rows: np.ndarray, n: int, size: int, decoder: str,
          skip_bad: bool, workers: int, progress: bool) -> None:
    """Decode the rows not done yet into the cache, block by block, then mark it complete."""
    import h5py

    with h5py.File(out, "r") as f:  # a finished cache is left untouched, byte for byte
        if f.attrs.get("complete", False) and f["done"][:][rows].all():
            return
    # Workers start before the file is opened, so that none of them inherits its handle
    # (and its lock): after a kill -9 the rerun can open the file at once.
    with _pool(workers) as pool, h5py.File(out, "a") as f:
        todo = np.sort(rows[~f["done"][:][rows]])
        if len(todo) < n:
            log.info("resuming: %d of %d rows already cached", n - len(todo), n)
        path_of = dict(zip(rows.tolist(), dataset.path))
        # Blocks of cache rows still to do (a resumed build has holes).
        blocks = [todo[i:i + BLOCK] for i in range(0, len(todo), BLOCK)]
        jobs = [(int(b[0]), [path_of[r] for r in b.tolist()], size, decoder, skip_bad)
                for b in blocks]
        with progress_bar(n, "caching pixels", enabled=progress, done=n - len(todo)) as advance:
            for block, (_, arr, bad) in zip(blocks, pool.map(_decode_block, jobs)):
                _commit_block(f, block, arr, bad, f["image_id"])
                advance(len(block))
        f.attrs["complete"] = True


def _create_file(path: Path, ids: np.ndarray, size: int, decoder: str) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        create_cache(f, ids, size, decoder)


def create_rows(f, ids: np.ndarray, size: int, decoder: str) -> None:
    """A cache's attributes, ``image_id`` and ``done`` (no pixels yet)."""
    import h5py

    f.attrs.update(format=CACHE_FORMAT, size=size, decoder=decoder,
                   preprocessing=json.dumps(PREPROCESSING), complete=False, skipped="{}")
    f.create_dataset("image_id", data=ids.astype(object), dtype=h5py.string_dtype())
    f.create_dataset("done", shape=(len(ids),), dtype=bool, fillvalue=False)


def create_cache(f, ids: np.ndarray, size: int, decoder: str) -> None:
    import h5py

    n = len(ids)
    create_rows(f, ids, size, decoder)
    # All of the pixels' space is taken now, while the file is still a temporary one: a
    # full disk (or file size limit) then fails here, before the cache takes its name, and
    # never leaves a file whose size its header contradicts (which h5py cannot reopen).
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # rows are read only once marked done
    f.create_dataset("pixels", shape=(n, size, size), dtype=np.uint8, dcpl=dcpl)
    f.flush()


def _commit_block(f, block: np.ndarray, arr: np.ndarray, bad: dict[int, str], image_id) -> None:
    """Pixels, then (for skipped images) their reasons, then the done flags."""
    _write_rows(f["pixels"], block, arr)
    if bad:
        skipped = json.loads(f.attrs.get("skipped") or "{}")
        skipped.update({image_id.asstr()[int(block[i])]: why for i, why in bad.items()})
        f.attrs["skipped"] = json.dumps(skipped)
    f.flush()  # pixels reach the file before their done flags
    _write_rows(f["done"], block, np.ones(len(block), dtype=bool))
    f.flush()


def _attr(path: Path, name: str):
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs.get(name)


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
        self._check_shards()
        self.image_id = self._file["image_id"].asstr()[:]
        self.size = int(self._file.attrs["size"])
        self.done = self._file["done"][:]
        #: ``{image_id: why}``: images that could not be decoded (``cache --skip-bad``)
        self.skipped: dict[str, str] = json.loads(self._file.attrs.get("skipped") or "{}")
        self._pixels = self._file["pixels"]
        self._row = {name: r for r, name in enumerate(self.image_id)}

    def __len__(self) -> int:
        return len(self.image_id)

    def _check_shards(self) -> None:
        """A cache joined as a virtual dataset reads its pixels from its shards: HDF5
        would read a missing shard's rows as zeros, silently, so a missing one is an
        error here."""
        pixels = self._file["pixels"]
        if not pixels.is_virtual:
            return
        for source in pixels.virtual_sources():
            shard = self.path.parent / source.file_name  # HDF5 resolves it there too
            if not shard.is_file():
                raise DataError(
                    f"pixel cache {self.path} reads its pixels from its shard {shard}, which "
                    "is not there; a cache joined by `torchrun ... cxrembed cache` keeps its "
                    f"shards ({self.path.name}.shard-*) beside it: move them with it, or "
                    "build the cache again with `cxrembed cache ... --overwrite`")

    def rows_for(self, image_ids: np.ndarray) -> np.ndarray:
        """Cache rows of the given image ids (DataError naming the first that is absent)."""
        try:
            return np.fromiter((self._row[i] for i in image_ids), dtype=np.int64,
                               count=len(image_ids))
        except KeyError as exc:
            raise DataError(f"image {exc.args[0]} is not in pixel cache {self.path}; rebuild "
                            "the cache for this dataset") from None

    def check_rows(self, rows: np.ndarray) -> None:
        """DataError naming the first of ``rows`` that holds no image (skipped, not cached)."""
        for row in rows[~self.done[rows]].tolist()[:1]:
            raise DataError(f"image {self.image_id[row]} is not in pixel cache {self.path} "
                            "(not in the dataset when the cache was built); rebuild the cache")
        for row in rows.tolist() if self.skipped else []:
            if self.image_id[row] in self.skipped:
                raise DataError(f"image {self.image_id[row]} was skipped when pixel cache "
                                f"{self.path} was built: {self.skipped[self.image_id[row]]}")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (k, S, S) pixels of cache rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        self.check_rows(rows)
        if len(rows) == 0:
            return np.zeros((0, self.size, self.size), np.uint8)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        uniq, inverse = np.unique(sorted_rows, return_inverse=True)
        if uniq[-1] - uniq[0] + 1 == len(uniq):  # a run of rows (encode): one slice
            block = self._pixels[uniq[0]:uniq[-1] + 1]
        else:
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
                                f"{size}px are needed; rebuild it with `cxrembed cache "
                                "--overwrite`")
            self._cache_rows = self.cache.rows_for(dataset.image_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (k, size, size) images of dataset rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache is not None:
            return self.cache.read(self._cache_rows[rows])
        out = np.zeros((len(rows), self.size, self.size), np.uint8)
        for i, row in enumerate(rows.tolist()):
            out[i] = decode(self.dataset.path[row], size=self.size, decoder=self.decoder)
        return out

    def read_checked(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Like :meth:`read`, but an unreadable image is left out instead of raising:
        returns the pixels of the readable rows, a bool mask of them, and why each other
        row could not be read."""
        rows = np.asarray(rows, dtype=np.int64)
        ok = np.ones(len(rows), dtype=bool)
        reasons, parts = [], []
        for i, row in enumerate(rows.tolist()):
            try:
                parts.append(self.read(np.array([row])))
            except DataError as exc:
                ok[i] = False
                reasons.append(str(exc))
        pixels = np.concatenate(parts) if parts else np.zeros((0, self.size, self.size),
                                                              np.uint8)
        return pixels, ok, reasons
