"""Encode every image of a dataset once, into an HDF5 store with a FAISS index beside it.

``encode_dataset`` checks everything cheap first (the store path, options, prompts file,
pixel cache), then loads the model, then composes the pipeline: a
:class:`~cxrembed.encode.reader.BatchReader` (pixel cache or PNG decoding, threads
reading ahead), a :class:`~cxrembed.encode.mapper.ClipMapper` (the encoder) and a
:class:`~cxrembed.store.StoreWriter` (chunks that survive a kill), run by
:func:`~cxrembed.encode.runner.run_pipeline`. The store layout is in
:mod:`cxrembed.store.schema`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.encode.output import encoder_attrs, remove_store_files, reopen, row_fields
from cxrembed.store.lock import holding_lock
from cxrembed.encode.reader import BatchReader
from cxrembed.encode.runner import run_pipeline
from cxrembed.errors import ConfigError, DataError, StoreError

log = logging.getLogger(__name__)

#: Rows committed per chunk, rounded up to a whole number of batches. A kill loses at most
#: this many rows of work; each commit costs two small flushes.
CHUNK_ROWS = 1024


@dataclass
class EncodeResult:
    """What an encode did."""

    store: Path
    index: Path | None
    rows: int  # rows in the store
    encoded: int  # rows encoded by this call (the rest were done by an earlier, resumed one)
    resumed_from: int  # rows already in the store when this call started
    seconds: float  # wall time of the encoding loop
    images_per_s: float  # encoded / seconds
    stage_seconds: dict = field(default_factory=dict)  # read / infer / write totals
    embedding_health: dict | None = None  # the store's ``embedding_health`` attribute
    skipped: list = field(default_factory=list)  # [{"image_id", "reason"}]
    #: read from PNGs and waited longer for decoded images than the model computed: a
    #: pixel cache (``cxrembed cache``) would feed the model faster
    decode_bound: bool = False
    #: the figure that decides whether searches centre (``search_centring`` attribute)
    search_centring: dict | None = None
    #: under torchrun: on rank 0, each rank's shard result (with ``rank``) and the seconds
    #: the join took; on the other ranks, the shard file this rank wrote
    shards: list = field(default_factory=list)
    join_seconds: float | None = None
    shard: str | None = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def select_rows(dataset: Any, splits: Sequence[str] | None = None, limit: int | None = None
                ) -> np.ndarray:
    """Dataset rows to encode: those of ``splits`` (all when None), the first ``limit``."""
    from cxrembed.data.splits import SPLITS

    keep = np.ones(len(dataset), dtype=bool)
    if splits:
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ConfigError(f"unknown split(s) {', '.join(bad)}; expected "
                              f"{', '.join(SPLITS)}")
        keep &= np.isin(dataset.split, list(splits))
    rows = np.flatnonzero(keep)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: give a positive number of images")
        rows = rows[:limit]
    if not len(rows):
        raise DataError(f"no images to encode (splits {list(splits or SPLITS)}, "
                        f"{len(dataset)} images in the dataset)")
    return rows


def _check_options(out: Path, batch_size: int, index: str | None, resume: bool,
                   overwrite: bool) -> None:
    from cxrembed.store import INDEX_KINDS

    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: give a positive number")
    if index is not None and index not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {index!r}; expected {', '.join(INDEX_KINDS)} "
                          "or none")
    if out.exists() and not (resume or overwrite):
        raise StoreError(f"store {out} already exists; pass --resume to continue it or "
                         "--overwrite to replace it")
    if out.is_dir():
        raise StoreError(f"--out {out} is a folder; give a file name such as {out}/store.h5")


def _locked_file(arguments: dict) -> Path:
    """The file an encode holds the writer lock of for its whole run: the store, or for
    ``--append`` the ``.appending`` work file (the store itself is locked only for the
    final swap, so searches of the finished store go on meanwhile)."""
    from cxrembed.encode.append import appending_path

    out = Path(arguments["out"])
    return appending_path(out) if arguments.get("append") else out


@holding_lock(_locked_file, "cxrembed encode")  # one writer per store (store/lock.py)
def encode_dataset(
    dataset: Any,
    out: str | os.PathLike,
    encoder: Any,
    *,
    pixel_cache: str | os.PathLike | None = None,
    batch_size: int = 64,
    resume: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
    splits: Sequence[str] | None = None,
    prompts: dict | str | os.PathLike | None = None,
    index: str | None = "flat",
    workers: int = 2,
    chunk_rows: int | None = None,
    progress: bool = True,
    allow_other_data: bool = False,
    skip_bad: bool = False,
    append: bool = False,
    centre: str = "auto",
) -> EncodeResult:
    """Encode ``dataset`` (an :class:`~cxrembed.data.nih.NIHDataset`) into the store ``out``.

    Args:
        encoder: a :class:`cxrembed.model.Encoder`, or a function without arguments that
            loads one (called only once the cheap checks have passed).
        pixel_cache: a pixel cache of the dataset (``cxrembed cache``); PNGs are decoded
            when None.
        resume: continue an interrupted store at ``out`` (a fresh one is started when
            there is none). The batch size of the first run is kept, so the result equals
            an uninterrupted run's. Images no longer in the dataset are dropped from it.
        overwrite: replace an existing store at ``out``.
        limit, splits: encode only the first ``limit`` images of these splits.
        prompts: class prompts, a dict or a JSON file in the format of
            :mod:`cxrembed.prompts`; the defaults otherwise. Stored with their text
            embeddings when the encoder has a text tower.
        allow_other_data: encode with an adapted encoder data that is not split as its
            run's data was (otherwise refused: its val/test could hold training images).
        index: the FAISS index to build at the end (one of ``INDEX_KINDS``; None: none).
        workers: threads reading ahead of the model (0: read inline).
        chunk_rows: rows per committed chunk (default ~1024, a multiple of the batch size).
        skip_bad: leave out images that cannot be read (listed in the result and in the
            store's ``skipped_images``) instead of stopping at the first.
        append: add the selected images the finished store ``out`` lacks, after its rows
            (:mod:`cxrembed.encode.append`); resumable by running it again.
        centre: whether the index built at the end holds centred vectors: ``auto`` (as
            the figure measured on the store decides), ``on`` or ``off``
            (:mod:`cxrembed.store.centring`).

    Under ``torchrun`` every process calls this with the same arguments: each encodes its
    contiguous share into a shard and rank 0 joins them into ``out``
    (:mod:`cxrembed.encode.shards`); the store equals a one-process encode's row for row.
    """
    options = dict(locals())
    from cxrembed.data.cache import ImageSource
    from cxrembed.prompts import class_prompts

    from cxrembed.distributed import launch

    here = launch()
    if here.distributed:
        from cxrembed.encode.shards import IN_SHARD, encode_shards

        if not IN_SHARD.get():
            return encode_shards(options, here)
    out = Path(out)
    if append:
        from cxrembed.encode.append import append_dataset

        if overwrite:
            raise ConfigError("--append adds to an existing store; drop --overwrite")
        return append_dataset(dataset, out, encoder, pixel_cache=pixel_cache,
                              batch_size=batch_size, limit=limit, splits=splits,
                              workers=workers, progress=progress, skip_bad=skip_bad)
    _check_options(out, batch_size, index, resume, overwrite)
    _check_centre(centre)
    labels = list(getattr(dataset, "label_names", None) or _nih_labels())
    text_prompts = class_prompts(prompts, labels)  # a bad file fails before the model loads
    rows = select_rows(dataset, splits, limit)
    part = dataset.subset(rows) if len(rows) < len(dataset) else dataset
    source = ImageSource(part, cache_path=pixel_cache)  # a wrong cache fails here too
    if callable(encoder) and not hasattr(encoder, "encode_image"):
        encoder = encoder()
    if getattr(encoder, "run", None) and not allow_other_data:
        from cxrembed.model.run_state import check_run_data

        check_run_data(encoder.run, dataset)

    writer, source_rows, created = _open_writer(out, overwrite, part, encoder, text_prompts,
                                                prompts is not None, batch_size, chunk_rows,
                                                splits, limit)
    if writer.complete:
        return _already_complete(writer, out, index, progress, centre)
    batch_size = writer.batch_size  # a resumed store keeps its first run's
    try:
        return _run(writer, source, source_rows, encoder, out, batch_size, workers, index,
                    progress, skip_bad, centre)
    except BaseException:
        if created and writer.rows_done == 0:  # a failed start leaves nothing behind
            writer.close()
            remove_store_files(out)
        raise


def _open_writer(out: Path, overwrite: bool, part: Any, encoder: Any, text_prompts: dict,
                 prompts_given: bool, batch_size: int, chunk_rows: int | None, splits: Any,
                 limit: Any) -> tuple[Any, np.ndarray, bool]:
    """The store's writer (``out`` reopened to resume, or created anew), the rows of
    ``part`` it still lacks, and whether it was created now."""
    if out.exists() and not overwrite:
        writer, source_rows = reopen(out, encoder.fingerprint, part.image_id, part.split)
        if not writer.complete and writer.batch_size != batch_size:
            log.warning("resuming with the first run's batch size %d (not %d) so the vectors "
                        "equal an uninterrupted run's", writer.batch_size, batch_size)
        return writer, source_rows, False
    remove_store_files(out)
    writer = _create_store(out, part, encoder, text_prompts, prompts_given, batch_size,
                           chunk_rows, splits, limit)
    return writer, np.arange(len(part)), True


def _nih_labels() -> list[str]:
    from cxrembed.labels import LABELS

    return list(LABELS)


def _create_store(out: Path, part: Any, encoder: Any, text_prompts: dict, prompts_given: bool,
                  batch_size: int, chunk_rows: int | None, splits: Any, limit: Any) -> Any:
    from cxrembed.encode.mapper import encode_texts
    from cxrembed.prompts import distinct_prompts
    from cxrembed.store import StoreWriter

    chunk = chunk_rows or CHUNK_ROWS
    chunk = max(batch_size, -(-chunk // batch_size) * batch_size)
    text_vectors = None
    if encoder.has_text:
        text_vectors = encode_texts(encoder, distinct_prompts(text_prompts))
    elif prompts_given:
        log.warning("%s has no text tower: the prompts are not stored", encoder.model_name)
    fingerprint = encoder.fingerprint
    out.parent.mkdir(parents=True, exist_ok=True)
    return StoreWriter.create(
        out, rows=row_fields(part), embed_dim=int(encoder.embed_dim),
        fingerprint=fingerprint, has_head=bool(encoder.has_head),
        has_text=bool(encoder.has_text), batch_size=batch_size, chunk_rows=chunk,
        prompts=text_prompts if encoder.has_text else None, text_embeddings=text_vectors,
        label_names=getattr(part, "label_names", None),
        head_label_names=getattr(encoder, "label_names", None),
        attrs={**encoder_attrs(encoder), "dataset": getattr(part, "dataset", "nih"),
               "preprocessing": fingerprint.get("preprocessing") or _preprocessing(),
               "dataset_root": str(Path(part.root).resolve()),
               "dataset_sources": dict(getattr(part, "sources", {}) or {}),
               "selection": {"splits": list(splits) if splits else None, "limit": limit},
               **_links_attr(part)})


def _links_attr(part: Any) -> dict:
    """``follow_links``: read with --follow-links, so montages and serve's thumbnails
    read this store's images through links inside the data folder too."""
    return {"follow_links": True} if getattr(part, "follow_links", False) else {}


def _run(writer: Any, source: Any, source_rows: np.ndarray, encoder: Any, out: Path,
         batch_size: int, workers: int, index: str | None, progress: bool,
         skip_bad: bool, centre: str = "auto") -> EncodeResult:
    import torch

    from cxrembed.encode.mapper import ClipMapper
    from cxrembed.progress import progress_bar

    n, start = writer.num_rows, writer.rows_done
    device = getattr(encoder, "device", "cpu")
    reader = BatchReader(source, np.arange(start, n), source_rows[start:], batch_size,
                         skip_bad=skip_bad, workers=workers,
                         pin_memory=torch.device(device).type == "cuda")
    if start:
        log.info("resuming %s at row %d of %d", out, start, n)
    began = time.perf_counter()
    with writer, progress_bar(n, "encoding", enabled=progress, done=start) as advance:
        stages = run_pipeline(reader, ClipMapper(encoder), writer, advance=advance)
        health = _health(writer)
        if len(writer.skipped) >= n:
            raise DataError(f"none of the {n} images could be read (first: "
                            f"{next(iter(writer.skipped.values()))})")
        skipped = _skipped_list(writer)
        centring = _centring(writer)
        writer.finish({"embedding_health": health, **centring})
    seconds = time.perf_counter() - began
    encoded = n - start
    log.info("encoded %d images in %.1f s (%.1f images/s; read %.1f s, infer %.1f s, write "
             "%.1f s) into %s", encoded, seconds, encoded / max(seconds, 1e-9), stages.read,
             stages.infer, stages.write, out)
    if skipped:
        log.warning("%d unreadable image(s) left out of %s (first: %s: %s)", len(skipped),
                    out, skipped[0]["image_id"], skipped[0]["reason"])
    bound = decode_bound(source, stages)
    if bound:
        log.info("decode-bound: waited %.1f s for PNG decoding, %.1f s in the model; a pixel "
                 "cache (cxrembed cache) removes the decoding", stages.read, stages.infer)
    built = _build_index(out, index, progress, centre)
    return EncodeResult(out, built, n - len(skipped), encoded, start, seconds,
                        encoded / max(seconds, 1e-9), stages.to_dict(), health, skipped,
                        decode_bound=bound, search_centring=centring["search_centring"])


def decode_bound(source: Any, stages: Any) -> bool:
    """True when images came from PNGs (no pixel cache) and the run waited longer for them
    than the model took: decoding, not the model, set the pace."""
    return getattr(source, "cache", None) is None and stages.read > stages.infer


def _health(writer: Any) -> dict:
    from cxrembed.store.health import embedding_health, sample_rows, warn_if_collapsed

    kept = np.setdiff1d(np.arange(writer.num_rows), np.fromiter(writer.skipped, np.int64))
    health = embedding_health(writer.read_unit_vectors(sample_rows(kept)))
    warn_if_collapsed(health, f"store {writer.path}")
    return health


def _centring(writer: Any) -> dict:
    """The mean vector and the figure that decide whether searches centre
    (:mod:`cxrembed.store.centring`), over the rows kept."""
    from cxrembed.store.centring import store_centring_attrs

    kept = np.ones(writer.num_rows, dtype=bool)
    kept[np.fromiter(writer.skipped, np.int64)] = False
    return store_centring_attrs(writer.read_unit_block, writer.num_rows,
                                writer.column("labels"), writer.label_known(),
                                writer.column("patient_id"), kept)


def _skipped_list(writer: Any) -> list[dict]:
    ids = writer.column("image_id")
    return [{"image_id": str(ids[r]), "reason": why} for r, why in sorted(writer.skipped.items())]


def _already_complete(writer: Any, out: Path, index: str | None, progress: bool,
                      centre: str = "auto") -> EncodeResult:
    from cxrembed.store import index_path

    attrs = writer.attrs
    writer.close()
    log.info("store %s is already complete", out)
    built = None
    if index is not None and not index_path(out).exists():
        built = _build_index(out, index, progress, centre)
    elif index_path(out).exists():
        built = index_path(out)
    n = int(attrs["num_rows"])
    return EncodeResult(out, built, n, 0, n, 0.0, 0.0, {},
                        attrs.get("embedding_health"), attrs.get("skipped_images") or [],
                        search_centring=attrs.get("search_centring"))


def _build_index(out: Path, index: str | None, progress: bool, centre: str = "auto"
                 ) -> Path | None:
    from cxrembed.store import build_index

    if index is None:
        return None
    return build_index(out, index, progress=progress, centre=centre)


def _check_centre(centre: str) -> None:
    from cxrembed.store.centring import CENTRE_CHOICES

    if centre not in CENTRE_CHOICES:
        raise ConfigError(f"--centre {centre!r}: expected one of {', '.join(CENTRE_CHOICES)}")


def _preprocessing() -> dict:
    from cxrembed.data.images import PREPROCESSING

    return dict(PREPROCESSING)
