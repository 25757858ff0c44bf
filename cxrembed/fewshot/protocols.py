"""The training-free protocols on their own: text zero-shot and the adapted head.

The paper's "zero-shot" figure (0.7502) is its adapted model's supervised head on the test
set, with no text prompt: cxrembed reports that as ``adapted-head``
(:func:`evaluate_adapted_head`) and offers real text zero-shot (:func:`evaluate_zeroshot`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.fewshot.data import EvalData, as_eval_data
from cxrembed.fewshot.results import eval_set, json_number, per_class_dict, to_jsonable
from cxrembed.labels import LABELS
from cxrembed.metrics import BootstrapCI, bootstrap_auc, mean_auc, per_class_auc


@dataclass
class EvalResult:
    """One protocol scored on one split: per-class AUCs, mean, patient-bootstrap CI."""

    protocol: str
    split: str
    auc: np.ndarray
    ci: BootstrapCI | None
    n_rows: int
    source: dict[str, Any]
    label_names: tuple[str, ...] = LABELS

    @property
    def mean_auc(self) -> float:
        return mean_auc(self.auc, warn=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"format": "cxrembed.eval", "protocol": self.protocol, "split": self.split,
               "n_rows": self.n_rows, "labels": list(self.label_names),
               "auc": per_class_dict(self.auc, self.label_names),
               "mean_auc": json_number(self.mean_auc), "source": self.source}
        if self.ci is not None:
            out["ci"] = self.ci.to_dict()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=to_jsonable))
        return path


def _evaluate(protocol: str, data: EvalData, scores_of: Callable[[np.ndarray], np.ndarray],
              split: str, bootstrap: int, level: float, seed: int) -> EvalResult:
    rows = data.rows(split)
    if not len(rows):
        raise DataError(f"no {split} rows to evaluate")
    scores = scores_of(rows)
    y, known, names = data.labels[rows], data.known[rows], data.label_names
    if bootstrap:
        ci = bootstrap_auc(y, scores, data.patient_id[rows], n_resamples=bootstrap,
                           level=level, seed=seed, names=names, known=known)
        auc = ci.auc
    else:
        ci, auc = None, per_class_auc(y, scores, names=names, known=known)
    return EvalResult(protocol, split, auc, ci, len(rows),
                      {**data.source, "eval_set": eval_set(split, data.image_id, rows)},
                      label_names=tuple(names))


def evaluate_zeroshot(source: Any, *, prompts: Any = None, split: str = "test",
                      bootstrap: int = 1000, level: float = 0.95, seed: int = 0
                      ) -> EvalResult:
    """Text zero-shot (CheXzero style) on ``split``. Stored prompts need no model weights;
    ``prompts`` (dict or JSON file) not in the store are encoded with its text tower."""
    from cxrembed.heads import make_head

    data = as_eval_data(source, prompts=prompts, need_text=True)
    try:
        if data.text is None:
            raise ConfigError("zero-shot needs prompt embeddings (EvalData.text)")
        head = make_head("zeroshot", text=data.text, label_names=data.label_names)
        return _evaluate("zeroshot", data, lambda rows: head.predict(data.vectors(rows)[1]),
                         split, bootstrap, level, seed)
    finally:
        if data is not source:
            data.close()


def evaluate_adapted_head(source: Any, *, split: str = "test", bootstrap: int = 1000,
                          level: float = 0.95, seed: int = 0,
                          label_map: str | os.PathLike | None = None) -> EvalResult:
    """The adapted model's own head on ``split`` (the figure the paper calls zero-shot).

    On a store of another collection (an NIH-adapted run encoding CheXpert, say), the head's
    classes are matched to the store's through the label map (the shipped one, or
    ``label_map``) and only the shared classes are scored, under the store's names.
    """
    data = as_eval_data(source, need_text=False)
    try:
        shared = shared_head_classes(data, label_map)
        return _evaluate("adapted-head", shared, shared.logits, split, bootstrap, level, seed)
    finally:
        if data is not source:
            data.close()


def shared_head_classes(data: EvalData, label_map: str | os.PathLike | None = None
                        ) -> EvalData:
    """``data`` cut to the classes its adapted head shares with its labels (itself when
    they are the same classes); the source records the map used."""
    if list(data.head_label_names) == list(data.label_names):
        return data
    from cxrembed.labelmap import load_label_map

    mapping = load_label_map(label_map)
    pairs = mapping.pairs(data.head_vocabulary, data.vocabulary, data.head_label_names,
                          data.label_names)
    if not pairs:
        raise DataError(
            f"the adapted head's classes ({data.head_vocabulary}: "
            f"{', '.join(data.head_label_names)}) share none with the store's "
            f"({data.vocabulary}: {', '.join(data.label_names)}) under label map "
            f"{mapping.source}; pass --label-map FILE naming the equivalent findings")
    head_cols = [h for h, _ in pairs]
    cols = [c for _, c in pairs]
    used = {data.label_names[c]: data.head_label_names[h] for h, c in pairs}
    return EvalData(
        labels=data.labels[:, cols], known=data.known[:, cols], patient_id=data.patient_id,
        split=data.split, embeddings=data.embeddings, image_id=data.image_id,
        label_names=tuple(data.label_names[c] for c in cols), vocabulary=data.vocabulary,
        head_logits=lambda rows: data.logits(rows)[:, head_cols],
        source={**data.source, "label_map": {"file": mapping.source, "head": data.head_vocabulary,
                                             "store": data.vocabulary, "classes": used}})
