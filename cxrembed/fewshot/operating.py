"""A saved head on a split: AUCs, and what its stored thresholds and calibration do there.

``cxrembed evaluate STORE --head HEAD_DIR`` reports, beside per-class AUC with patient
bootstrap intervals: sensitivity, specificity, PPV and NPV at the thresholds stored in the
card (fitted on val), with patient-bootstrap intervals; the expected calibration error of
the head's own probabilities and of the calibrated ones; and the reliability-diagram
points (per class and pooled) in the JSON, for the report to draw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrembed.errors import DataError
from cxrembed.fewshot.protocols import EvalResult


@dataclass
class HeadEvalResult(EvalResult):
    """:class:`EvalResult` plus operating points and calibration of a saved head."""

    operating: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "operating_points": self.operating,
                "calibration": self.calibration}


def _ece_block(prob: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    from cxrembed.calibration import expected_calibration_error

    per_class, diagrams = {}, {}
    for c, name in enumerate(names):
        ece, diagram = expected_calibration_error(prob[:, c], labels[:, c])
        per_class[name] = None if np.isnan(ece) else ece
        diagrams[name] = diagram
    pooled, pooled_diagram = expected_calibration_error(prob.ravel(), labels.ravel())
    defined = [v for v in per_class.values() if v is not None]
    return {"ece": per_class, "mean_ece": float(np.mean(defined)) if defined else None,
            "pooled_ece": None if np.isnan(pooled) else pooled,
            "reliability": {"pooled": pooled_diagram, "per_class": diagrams}}


def evaluate_saved_head(store_path: str | os.PathLike, head: str | os.PathLike, *,
                        split: str = "test", bootstrap: int = 1000, level: float = 0.95,
                        seed: int = 0) -> HeadEvalResult:
    """Score the saved head on ``split`` of the store (see the module doc)."""
    from cxrembed.calibration import operating_point, uncalibrated
    from cxrembed.fewshot.results import eval_set
    from cxrembed.heads.saved import load_head
    from cxrembed.metrics import bootstrap_auc, per_class_auc
    from cxrembed.store import EmbeddingStore, check_same_encoder

    saved = load_head(head)
    with EmbeddingStore.open(store_path) as store:
        check_same_encoder(saved.fingerprint, store, what=(f"head {head}", f"store {store.path}"))
        rows = store.select(split=split)
        if not len(rows):
            raise DataError(f"store {store.path} has no {split} rows to evaluate")
        labels = store.labels[rows].astype(np.uint8)
        patients = store.patient_id[rows]
        prediction = saved.predict(store.embeddings(rows, normalized=False))
        names = saved.label_names
        source = {"store": str(store.path), "head": str(head), "kind": saved.kind,
                  "fingerprint": store.fingerprint,
                  "eval_set": eval_set(split, store.image_id, rows),
                  "thresholds_fitted_on": "val", "in_sample": split == "val"}
    if bootstrap:
        ci = bootstrap_auc(labels, prediction.scores, patients, n_resamples=bootstrap,
                           level=level, seed=seed, names=names, warn=False)
        auc = ci.auc
    else:
        ci, auc = None, per_class_auc(labels, prediction.scores, warn=False)
    operating = {}
    for c, name in enumerate(names):
        cal = saved.calibration.get(name)
        if cal is None or np.isnan(cal.threshold):
            operating[name] = {"threshold": None, "note": cal.note if cal else "no threshold"}
            continue
        operating[name] = {"threshold": cal.threshold,
                           **operating_point(labels[:, c], prediction.positive[:, c], patients,
                                             bootstrap=bootstrap, seed=seed, level=level)}
    before = uncalibrated(prediction.scores, saved.card.get("score_kind", "logit"))
    calibration = {"method": saved.card.get("calibration", {}).get("method"),
                   "threshold_rule": saved.card.get("calibration", {}).get("threshold_rule"),
                   "before": _ece_block(before, labels, names),
                   "after": _ece_block(prediction.probability, labels, names)}
    return HeadEvalResult(f"saved-head:{saved.kind}", split, auc, ci, int(len(rows)), source,
                          label_names=tuple(names), operating=operating,
                          calibration=calibration)
