"""What a sweep reads: row-aligned labels, patients and splits, and vectors on demand.

:class:`EvalData` holds numpy arrays (or readers of them); :meth:`EvalData.from_store`
adapts an :class:`~cxrembed.store.EmbeddingStore`, reading vectors only for the rows asked
for and prompt embeddings from the store (no model needed for stored prompts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError, StoreError
from cxrembed.labels import LABELS

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Row-aligned arrays for every image, and where to get vectors, prompts and logits.

    ``embeddings`` is either an ``(N, D)`` array of the encoder's raw vectors or a callable
    ``rows -> (k, D)`` (a store reads only the rows asked for). Unit vectors are derived.
    """

    labels: np.ndarray  # (N, C) 0/1, C = len(label_names)
    patient_id: np.ndarray  # (N,)
    split: np.ndarray  # (N,) "train" / "val" / "test"
    embeddings: np.ndarray | Callable[[np.ndarray], np.ndarray]
    #: {class: (positive prompt vectors (p, D), negative prompt vectors (q, D))}
    text: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    head_logits: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None
    #: the adapted head's weights (or a loader of them) for ``init="adapted"``
    head_state: dict | Callable[[], dict] | None = None
    image_id: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=dict)
    #: called by :meth:`close` (a store opened on the caller's behalf)
    on_close: Callable[[], None] | None = None
    #: the classes, the column order of ``labels`` (default: NIH's 14)
    label_names: tuple[str, ...] | None = None
    #: (N, C) bool, False where a label is unknown: left out of AUCs and of shot sampling
    known: np.ndarray | None = None
    #: the adapted head's classes (the columns of ``head_logits``; default: label_names)
    head_label_names: tuple[str, ...] | None = None
    #: the vocabulary of ``label_names`` (a reader: nih, chexpert, ...) and of the head's
    vocabulary: str = "nih"
    head_vocabulary: str = "nih"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        self.split = np.asarray(self.split).astype(str)
        self.patient_id = np.asarray(self.patient_id)
        n = len(self.labels)
        if self.labels.ndim != 2 or not self.labels.shape[1]:
            raise DataError(f"labels must be (N, classes), got {self.labels.shape}")
        classes = self.labels.shape[1]
        if self.label_names is None:
            self.label_names = (LABELS if classes == len(LABELS)
                                else tuple(f"class {i}" for i in range(classes)))
        self.label_names = tuple(self.label_names)
        self.head_label_names = tuple(self.head_label_names or self.label_names)
        if len(self.label_names) != classes:
            raise DataError(f"{len(self.label_names)} label names for {classes} label columns")
        self.known = (np.ones(self.labels.shape, dtype=bool) if self.known is None
                      else np.asarray(self.known, dtype=bool))
        if self.known.shape != self.labels.shape:
            raise DataError(f"known mask {self.known.shape} does not match labels "
                            f"{self.labels.shape}")
        for name in ("patient_id", "split"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{name} has {len(getattr(self, name))} rows, labels {n}")
        if not callable(self.embeddings):
            self.embeddings = np.asarray(self.embeddings)
            if len(self.embeddings) != n:
                raise DataError(f"embeddings have {len(self.embeddings)} rows, labels {n}")

    def close(self) -> None:
        """Release what was opened for this data (a store opened from a path)."""
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.split == split)

    def vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw and unit float32 vectors of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        raw = self.embeddings(rows) if callable(self.embeddings) else self.embeddings[rows]
        raw = np.asarray(raw, dtype=np.float32)
        unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        return raw, unit

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """The adapted head's logits for ``rows``."""
        if self.head_logits is None:
            raise StoreError("no adapted-head logits: the vectors come from a frozen encoder; "
                             "encode with an adapted run (--checkpoint RUN) to get them")
        rows = np.asarray(rows, dtype=np.int64)
        out = self.head_logits(rows) if callable(self.head_logits) else self.head_logits[rows]
        return np.asarray(out, dtype=np.float64)

    def adapted_state(self) -> dict:
        """The adapted head's weights (loads them when given as a loader)."""
        if self.head_state is None:
            raise StoreError("no adapted head to start from: the store was encoded with a "
                             "frozen encoder; use --init random (in Python: init='random') or a store "
                             "of an adapted run")
        return self.head_state() if callable(self.head_state) else self.head_state

    @classmethod
    def from_store(cls, store: Any, prompts: Any = None, need_text: bool = True
                   ) -> "EvalData":
        """Adapt an EmbeddingStore. Stored prompts need no model; new ones are encoded with
        the store's own text tower (its encoder is loaded only then)."""
        text, used = (None, None)
        if need_text:
            text, used = store_text(store, prompts)
        head_state = None
        if store.has_head:
            def head_state() -> dict:
                return store.encoder().head_state_dict()
        return cls(
            labels=store.labels, patient_id=store.patient_id, split=store.split,
            embeddings=lambda rows: store.embeddings(rows, normalized=False),
            text=text,
            head_logits=(lambda rows: store.head_logits(rows)) if store.has_head else None,
            head_state=head_state, image_id=store.image_id,
            label_names=tuple(store.label_names), known=store.label_known,
            head_label_names=tuple(store.head_label_names) if store.has_head else None,
            vocabulary=store.dataset,
            head_vocabulary=(store.attrs.get("head_vocabulary")
                             or ("nih" if list(store.head_label_names) == list(LABELS)
                                 else store.dataset)),
            source={"store": str(store.path), "dataset": store.dataset,
                    "model": store.attrs.get("model_name"),
                    "run": store.run, "rows": len(store), "fingerprint": store.fingerprint,
                    "prompts": used})


def store_text(store: Any, prompts: Any = None
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Prompt vectors per class from a store: stored prompts plus ``prompts`` (a dict or a
    JSON file) on top. Returns the vectors and a record of the prompts used."""
    from cxrembed.prompts import merge_prompts, read_prompts

    if not store.has_text:
        raise StoreError(f"store {store.path} has no text tower ({store.attrs.get('model_name')}"
                         "): zero-shot and Tip-Adapter need prompt embeddings")
    labels = list(store.label_names)
    merged = merge_prompts(store.prompts, read_prompts(prompts, labels), labels=labels)
    needed = list(dict.fromkeys(p for pos, neg in merged.values() for p in pos + neg))
    stored = store.text_embeddings(normalized=True)
    new = [p for p in needed if p not in stored]
    if new:
        log.info("encoding %d prompts not in the store with its text tower", len(new))
        stored = dict(stored)
        stored.update(zip(new, store.encode_prompts(new, normalized=True)))
    text = {name: (np.stack([stored[p] for p in pos]), np.stack([stored[p] for p in neg]))
            for name, (pos, neg) in merged.items()}
    return text, {"prompts": {k: [list(p), list(n)] for k, (p, n) in merged.items()},
                  "encoded": new}


def as_eval_data(source: Any, prompts: Any = None, need_text: bool = True) -> EvalData:
    """EvalData from an EvalData, an EmbeddingStore, or a store path."""
    if isinstance(source, EvalData):
        if prompts is not None:
            raise ConfigError("prompts apply to a store; with EvalData pass text= directly")
        return source
    if isinstance(source, (str, os.PathLike)):
        from cxrembed.store import EmbeddingStore

        store = EmbeddingStore.open(source)
        try:
            data = EvalData.from_store(store, prompts=prompts, need_text=need_text)
        except BaseException:
            store.close()
            raise
        data.on_close = store.close
        return data
    if hasattr(source, "embeddings") and hasattr(source, "fingerprint"):
        return EvalData.from_store(source, prompts=prompts, need_text=need_text)
    raise ConfigError(f"cannot evaluate a {type(source).__name__}; pass a store path, an "
                      "EmbeddingStore or an EvalData")
