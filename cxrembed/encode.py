"""Encode every image of a dataset once, into an HDF5 store with a FAISS index beside it.

reader -> mapper -> writer: a pool of threads reads batches (pixel cache or PNG decoding,
both release the GIL) a few batches ahead of the model, the encoder maps each batch to
joint-space vectors (bf16 autocast on CUDA), and :class:`~cxrembed.store.StoreWriter`
commits them in chunks that survive a kill. The store layout is in
:mod:`cxrembed.store.schema`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError, StoreError
from cxrembed.labels import NO_FINDING, NO_FINDING_PROMPT, canonical, default_prompts

log = logging.getLogger(__name__)

#: Rows committed per chunk, rounded up to a whole number of batches. A kill loses at most
#: this many rows of work; each commit costs two small flushes.
CHUNK_ROWS = 1024
SPLIT_NAMES = ("train", "val", "test")


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

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# ---------------------------------------------------------------------------------------
# Prompts


def class_prompts(prompts: dict | None = None, label_names: Sequence[str] | None = None
                  ) -> dict[str, tuple[list[str], list[str]]]:
    """Per class ``(positive prompts, negative prompts)``, plus ``No Finding``.

    ``label_names``: the dataset's classes (default: NIH's 14), each with a default prompt
    pair made from its name (:func:`cxrembed.labels.default_prompts`). ``prompts``
    overrides them per class; classes it does not name keep theirs.
    """
    names = list(label_names) if label_names is not None else None
    out = {name: (list(p), list(n)) for name, (p, n) in default_prompts(names).items()}
    out[NO_FINDING] = ([NO_FINDING_PROMPT], [])
    own = {name.lower(): name for name in out}
    for name, pair in (prompts or {}).items():
        key = own.get(name.strip().lower()) or canonical(name)
        pos, neg = pair
        if isinstance(pos, str) or isinstance(neg, str) or not (pos or neg):
            raise ConfigError(f"prompts of {name!r} must be two lists of strings "
                              "(positive, negative), not both empty")
        out[key] = (list(pos), list(neg))
    return out


def load_prompts(path: str | os.PathLike, label_names: Sequence[str] | None = None
                 ) -> dict[str, tuple[list[str], list[str]]]:
    """Read a prompts file (JSON) into :func:`class_prompts` form.

    Two shapes are accepted::

        {"Atelectasis": {"positive": ["..."], "negative": ["..."]}, ...}   per class
        {"templates": {"positive": ["a chest x-ray showing {disease}"],
                       "negative": ["no {disease}"]}}                       for every class
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read prompts file {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"prompts file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"prompts file {path} must hold a JSON object")
    given: dict[str, tuple[list[str], list[str]]] = {}
    templates = raw.pop("templates", None)
    if templates is not None:
        try:
            pos_t, neg_t = list(templates["positive"]), list(templates.get("negative", []))
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: 'templates' needs a 'positive' list") from None
        from cxrembed.labels import LABELS

        for name in (label_names or LABELS):
            disease = name.lower().replace("_", " ")
            given[name] = ([t.format(disease=disease) for t in pos_t],
                           [t.format(disease=disease) for t in neg_t])
    for name, value in raw.items():
        if not isinstance(value, dict) or "positive" not in value:
            raise ConfigError(f"{path}: {name!r} must map to "
                              '{"positive": [...], "negative": [...]}')
        given[name] = (list(value["positive"]), list(value.get("negative", [])))
    return class_prompts(given, label_names)


def distinct_prompts(prompts: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    """Every prompt once, in first-seen order (the store's ``text/prompt`` order)."""
    return list(dict.fromkeys(p for pair in prompts.values() for side in pair for p in side))


# ---------------------------------------------------------------------------------------
# Rows and encoder facts


def select_rows(dataset: Any, splits: Sequence[str] | None = None, limit: int | None = None
                ) -> np.ndarray:
    """Dataset rows to encode: those of ``splits`` (all when None), the first ``limit``."""
    keep = np.ones(len(dataset), dtype=bool)
    if splits:
        bad = [s for s in splits if s not in SPLIT_NAMES]
        if bad:
            raise ConfigError(f"unknown split(s) {', '.join(bad)}; expected "
                              f"{', '.join(SPLIT_NAMES)}")
        keep &= np.isin(dataset.split, list(splits))
    rows = np.flatnonzero(keep)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: give a positive number of images")
        rows = rows[:limit]
    if not len(rows):
        raise DataError(f"no images to encode (splits {list(splits or SPLIT_NAMES)}, "
                        f"{len(dataset)} images in the dataset)")
    return rows


def _row_fields(dataset: Any) -> dict[str, np.ndarray]:
    root = str(dataset.root)
    rel = np.array([os.path.relpath(p, root) if p else "" for p in dataset.path], dtype=str)
    return {"image_id": dataset.image_id, "patient_id": dataset.patient_id,
            "follow_up": dataset.follow_up, "split": dataset.split, "view": dataset.view,
            "sex": dataset.sex, "age": dataset.age, "labels": dataset.labels,
            "image_path": rel, "label_known": getattr(dataset, "label_known", None)}


def encoder_attrs(encoder: Any) -> dict[str, Any]:
    """The store attributes that describe an encoder (model, weights, run, how to reload)."""
    fingerprint = dict(encoder.fingerprint)
    weights = getattr(encoder, "weights", None) or getattr(encoder, "source", None)
    source = getattr(weights, "name", None) or fingerprint.get("weights_source") \
        or fingerprint.get("pretrained") or fingerprint.get("weights", "")
    sha = getattr(weights, "sha256", None) or fingerprint.get("sha256") or ""
    if isinstance(source, dict):  # a nested fingerprint of the weights
        sha = sha or source.get("sha256") or ""
        source = source.get("tag") or source.get("name") or source.get("kind", "")
    run = getattr(encoder, "run", None) or ""
    load_args = getattr(encoder, "load_args", None)
    return {"model_name": encoder.model_name, "weights_source": str(source or ""),
            "weights_sha256": str(sha or ""), "run": str(run),
            "load_args": _absolute_paths(load_args) if isinstance(load_args, dict) else None}


def _absolute_paths(args: dict) -> dict:
    """Weights files and run folders as absolute paths, so a reload works from anywhere."""
    out = dict(args)
    for key in ("pretrained", "checkpoint"):
        value = out.get(key)
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out


# ---------------------------------------------------------------------------------------
# Reading ahead


class _ReadAhead:
    """Yield ``(batch rows, input)`` in order while threads prepare the next batches.

    OpenCV decoding, HDF5 reads of the pixel cache and torch's CPU ops all release the
    GIL, so threads overlap them with the model without pickling anything into workers.
    """

    def __init__(self, read: Any, batches: list[np.ndarray], workers: int, depth: int) -> None:
        self.read, self.batches = read, batches
        self.workers, self.depth = workers, max(1, depth)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        if self.workers <= 0:
            for rows in self.batches:
                yield rows, self.read(rows)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cxrembed-read") as pool:
            pending: deque = deque()
            upcoming = iter(self.batches)
            try:
                for rows in upcoming:
                    pending.append((rows, pool.submit(self.read, rows)))
                    if len(pending) >= self.depth:
                        break
                while pending:
                    rows, future = pending.popleft()
                    nxt = next(upcoming, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(self.read, nxt)))
                    yield rows, future.result()
            finally:
                for _, future in pending:
                    future.cancel()


def _make_reader(source: Any, device: Any) -> Any:
    """rows -> uint8 pixels (pinned for a GPU). Threads do no torch work: on a CPU, torch
    ops in a reader thread fight the model's OpenMP threads for the same cores (measured:
    half the throughput of the cxr-tiny model), so normalising happens in the main thread,
    between forwards (and on the GPU, from uint8, when there is one)."""
    import torch

    cuda = torch.device(device).type == "cuda"

    def read(rows: np.ndarray) -> Any:
        pixels = torch.from_numpy(source.read(rows))
        return pixels.pin_memory() if cuda else pixels

    return read


# ---------------------------------------------------------------------------------------
# The pipeline


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
) -> EncodeResult:
    """Encode ``dataset`` (an :class:`~cxrembed.data.nih.NIHDataset`) into the store ``out``.

    Args:
        encoder: a :class:`cxrembed.model.Encoder` (frozen CLIP or adapted run).
        pixel_cache: a pixel cache of the dataset (``cxrembed cache``); PNGs are decoded
            when None.
        resume: continue an interrupted store at ``out`` (a fresh one is started when
            there is none). The batch size of the first run is kept, so the result equals
            an uninterrupted run's.
        overwrite: replace an existing store at ``out``.
        limit, splits: encode only the first ``limit`` images of these splits.
        prompts: class prompts (dict ``{class: (pos, neg)}`` or a JSON file, see
            :func:`load_prompts`); the defaults otherwise. Stored with their text
            embeddings when the encoder has a text tower.
        allow_other_data: encode with an adapted encoder data that is not split as its
            run's data was (otherwise refused: its val/test could hold training images).
        index: the FAISS index to build at the end (``flat``, ``ivf``, ``hnsw``; None:
            none).
        workers: threads reading ahead of the model (0: read inline).
        chunk_rows: rows per committed chunk (default ~1024, a multiple of the batch size).
    """
    import torch

    from cxrembed.data.cache import ImageSource
    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.progress import progress_bar
    from cxrembed.store import StoreWriter, build_index, index_path

    out = Path(out)
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: give a positive number")
    if index is not None and index not in ("flat", "ivf", "hnsw"):
        raise ConfigError(f"unknown index kind {index!r}; expected flat, ivf or hnsw")
    if getattr(encoder, "run", None) and not allow_other_data:
        from cxrembed.model.run_state import check_run_data

        check_run_data(encoder.run, dataset)
    rows = select_rows(dataset, splits, limit)
    part = dataset.subset(rows) if len(rows) < len(dataset) else dataset
    source = ImageSource(part, cache_path=pixel_cache)  # a wrong cache fails before any write
    fingerprint = encoder.fingerprint

    writer = None
    if out.exists() and not overwrite:
        if not resume:
            raise StoreError(f"store {out} already exists; pass --resume to continue it or "
                             "--overwrite to replace it")
        writer = StoreWriter.resume(out, image_id=part.image_id, fingerprint=fingerprint)
        if writer.complete:
            writer.close()
            log.info("store %s is already complete", out)
            built = None
            if index is not None and not index_path(out).exists():
                built = build_index(out, index, progress=progress)
            n = len(part)
            return EncodeResult(out, built or (index_path(out) if index_path(out).exists()
                                               else None), n, 0, n, 0.0, 0.0)
        if writer.batch_size != batch_size:
            log.warning("resuming with the first run's batch size %d (not %d) so the vectors "
                        "equal an uninterrupted run's", writer.batch_size, batch_size)
            batch_size = writer.batch_size
    if writer is None:
        if out.exists():
            out.unlink()
        for stale in (index_path(out), index_path(out).with_name(index_path(out).name + ".json")):
            stale.unlink(missing_ok=True)
        chunk = chunk_rows or CHUNK_ROWS
        chunk = max(batch_size, -(-chunk // batch_size) * batch_size)
        text_prompts, text_vectors = None, None
        if encoder.has_text:
            names = list(getattr(dataset, "label_names", None) or ()) or None
            text_prompts = (class_prompts(prompts, names) if prompts is None
                            or isinstance(prompts, dict) else load_prompts(prompts, names))
            text_vectors = _encode_texts(encoder, distinct_prompts(text_prompts))
        elif prompts is not None:
            log.warning("%s has no text tower: the prompts are not stored", encoder.model_name)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = StoreWriter.create(
            out, rows=_row_fields(part), embed_dim=int(encoder.embed_dim),
            fingerprint=fingerprint, has_head=bool(encoder.has_head),
            has_text=bool(encoder.has_text), batch_size=batch_size, chunk_rows=chunk,
            prompts=text_prompts, text_embeddings=text_vectors,
            label_names=getattr(dataset, "label_names", None),
            head_label_names=getattr(encoder, "label_names", None),
            attrs={**encoder_attrs(encoder), "dataset": getattr(dataset, "dataset", "nih"),
                   "preprocessing": fingerprint.get("preprocessing") or _preprocessing(),
                   "dataset_root": str(Path(dataset.root).resolve()),
                   "dataset_sources": dict(getattr(dataset, "sources", {}) or {}),
                   "selection": {"splits": list(splits) if splits else None, "limit": limit}})

    n, start = len(part), writer.rows_done
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(start, n, batch_size)]
    device = getattr(encoder, "device", "cpu")
    reader = _ReadAhead(_make_reader(source, device), batches, workers, depth=2 * max(1, workers))
    cuda = torch.device(device).type == "cuda"
    if start:
        log.info("resuming %s at row %d of %d", out, start, n)
    began = time.perf_counter()
    with writer, progress_bar(n, "encoding", enabled=progress) as advance:
        advance(start)
        for _, pixels in reader:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                         enabled=cuda):
                x = to_clip_tensor(pixels, device=device)  # float32, outside autocast's reach
                emb = encoder.encode_image(x)
                logits = encoder.head_logits(emb) if encoder.has_head else None
            writer.append(emb.float().cpu().numpy(),
                          None if logits is None else logits.float().cpu().numpy())
            advance(len(x))
        writer.finish()
    seconds = time.perf_counter() - began
    encoded = n - start
    log.info("encoded %d images in %.1f s (%.1f images/s) into %s", encoded, seconds,
             encoded / max(seconds, 1e-9), out)
    built = build_index(out, index, progress=progress) if index is not None else None
    return EncodeResult(out, built, n, encoded, start, seconds, encoded / max(seconds, 1e-9))


def _preprocessing() -> dict:
    from cxrembed.data.images import PREPROCESSING

    return dict(PREPROCESSING)


def _encode_texts(encoder: Any, prompts: list[str], batch: int = 256) -> np.ndarray:
    import torch

    parts = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            parts.append(encoder.encode_text(prompts[i:i + batch]).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, encoder.embed_dim), np.float32)
