"""Per-class calibration and operating thresholds, fitted on val; and how they do on test.

A head's scores rank images but are not probabilities (a linear head gives decision
values, Tip-Adapter logits around 100). On the **val** split, per class:

* calibration maps a score to a probability: ``platt`` (a one-feature logistic
  regression, sklearn) or ``isotonic`` (sklearn's IsotonicRegression); both are
  non-decreasing, so the ranking (and every AUC) is unchanged;
* an operating threshold on the score, by a rule: ``youden`` (max sensitivity +
  specificity - 1), ``sensitivity=0.9`` (the most specific threshold that keeps
  sensitivity >= 0.9), ``specificity=0.9`` (the most sensitive one with specificity >=
  0.9), ``f1`` (max F1). An image is positive when its score >= the threshold.

Both are plain numbers (:class:`ClassCalibration`), saved in the head's card. A class
without positives or negatives in val gets neither (NaN probability, never positive),
and is listed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError

CALIBRATIONS = ("platt", "isotonic", "none")
THRESHOLD_RULES = ("youden", "sensitivity=0.9", "specificity=0.9", "f1")
ECE_BINS = 15


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``youden`` | ``f1`` | ``sensitivity=X`` | ``specificity=X`` (X in (0, 1))."""
    text = rule.strip().lower()
    if text in ("youden", "f1"):
        return text, None
    match = re.fullmatch(r"(sensitivity|specificity)\s*=\s*([0-9.]+)", text)
    if match:
        target = float(match.group(2))
        if 0 < target < 1:
            return match.group(1), target
    raise ConfigError(f"threshold rule {rule!r}; expected one of: youden, f1, "
                      "sensitivity=X, specificity=X (X between 0 and 1, e.g. 0.9)")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


@dataclass
class ClassCalibration:
    """One class: score -> probability, and the score threshold of a positive call."""

    method: str  # platt | isotonic | none
    threshold: float = math.nan  # on the score; NaN: never positive
    slope: float = math.nan  # platt: p = sigmoid(slope * score + intercept)
    intercept: float = math.nan
    x: list[float] = field(default_factory=list)  # isotonic knots (score -> probability)
    y: list[float] = field(default_factory=list)
    score_kind: str = "logit"  # uncalibrated probability: sigmoid(score) or score itself
    note: str = ""  # why a class is not calibrated

    def probability(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "platt" and not math.isnan(self.slope):
            return sigmoid(self.slope * s + self.intercept)
        if self.method == "isotonic" and self.x:
            return np.interp(s, self.x, self.y)  # clipped at both ends, as sklearn's "clip"
        if self.method == "none":
            return uncalibrated(s, self.score_kind)
        return np.full(s.shape, np.nan)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        if math.isnan(self.threshold):
            return np.zeros(np.shape(scores), dtype=bool)
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in self.__dict__.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassCalibration":
        values = {k: (math.nan if v is None and k in ("threshold", "slope", "intercept")
                      else v) for k, v in d.items()}
        return cls(**values)


def uncalibrated(scores: np.ndarray, score_kind: str) -> np.ndarray:
    """The head's own probability: sigmoid of a logit, a [0, 1] score as is."""
    s = np.asarray(scores, dtype=np.float64)
    return sigmoid(s) if score_kind == "logit" else np.clip(s, 0.0, 1.0)


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of sklearn's unpenalised logistic regression on one score."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = float(scores.mean()), float(scores.std()) or 1.0
    model = LogisticRegression(C=np.inf, max_iter=1000)
    model.fit(((scores - mu) / sd)[:, None], y)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return a / sd, b - a * mu / sd


def fit_isotonic(scores: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Knots of sklearn's IsotonicRegression (non-decreasing, clipped outside)."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(scores, y)
    return [float(v) for v in model.X_thresholds_], [float(v) for v in model.y_thresholds_]


def pick_threshold(scores: np.ndarray, y: np.ndarray, rule: str) -> float:
    """The score threshold the rule picks on (scores, y); positive means score >= it."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    kind, target = parse_rule(rule)
    if kind == "f1":
        precision, recall, thresholds = precision_recall_curve(y, scores)
        f1 = np.where(precision + recall > 0,
                      2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
        return float(thresholds[int(np.argmax(f1[:-1]))])
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first threshold (+inf) calls nothing positive
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if kind == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if kind == "sensitivity":  # thresholds descend, tpr ascends: first that reaches it
        return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])
    ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # specificity: last that keeps it
    return float(thresholds[ok[-1]]) if len(ok) else float(thresholds[0])


def fit_calibration(scores: np.ndarray, labels: np.ndarray, names: list[str], *,
                    method: str = "platt", rule: str = "youden", score_kind: str = "logit"
                    ) -> dict[str, ClassCalibration]:
    """Per class: calibration and threshold fitted on these (val) scores and labels."""
    if method not in CALIBRATIONS:
        raise ConfigError(f"calibration {method!r}; expected one of {', '.join(CALIBRATIONS)}")
    parse_rule(rule)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.shape[1] != len(names):
        raise DataError(f"scores {scores.shape} and labels {labels.shape} do not match "
                        f"{len(names)} classes")
    out = {}
    for c, name in enumerate(names):
        s, y = scores[:, c], labels[:, c].astype(int)
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            out[name] = ClassCalibration(method, score_kind=score_kind,
                                         note=f"val has {pos} positives of {len(y)}")
            continue
        cal = ClassCalibration(method, threshold=pick_threshold(s, y, rule),
                               score_kind=score_kind)
        if method == "platt":
            cal.slope, cal.intercept = fit_platt(s, y)
        elif method == "isotonic":
            cal.x, cal.y = fit_isotonic(s, y)
        out[name] = cal
    return out


# ---------------------------------------------------------------------------------------
# How calibrated probabilities and thresholds do on a split


def expected_calibration_error(prob: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
                               ) -> tuple[float, dict[str, list]]:
    """ECE (equal-width bins, weighted by count) and the reliability-diagram points."""
    prob, y = np.asarray(prob, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(prob)
    prob, y = prob[keep], y[keep]
    if not len(prob):
        return math.nan, {"confidence": [], "frequency": [], "count": []}
    which = np.minimum((prob * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    conf = np.bincount(which, prob, minlength=bins)
    freq = np.bincount(which, y, minlength=bins)
    filled = count > 0
    ece = float(np.abs(conf[filled] - freq[filled]).sum() / len(prob))
    return ece, {"confidence": (conf[filled] / count[filled]).tolist(),
                 "frequency": (freq[filled] / count[filled]).tolist(),
                 "count": count[filled].astype(int).tolist()}


def operating_point(y: np.ndarray, decision: np.ndarray, patient_id: np.ndarray,
                    bootstrap: int = 1000, seed: int = 0, level: float = 0.95
                    ) -> dict[str, dict[str, float | None]]:
    """Sensitivity, specificity, PPV, NPV of 0/1 decisions, with percentile intervals over
    patient resamples (every image of a drawn patient counts as often as it is drawn)."""
    from cxrembed.metrics import resample_patients

    y = np.asarray(y, dtype=bool)
    d = np.asarray(decision, dtype=bool)
    index = np.unique(np.asarray(patient_id), return_inverse=True)[1].reshape(-1)
    weights = np.ones((int(index.max()) + 1, 1))
    if bootstrap > 0:
        weights = np.hstack([weights, resample_patients(len(weights), bootstrap, seed)])
    w = weights[index]  # (n, 1 + B) times each row counts
    tp, fp = (y & d) @ w, (~y & d) @ w
    fn, tn = (y & ~d) @ w, (~y & ~d) @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                  "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}
    out = {}
    alpha = (1 - level) / 2
    for name, v in values.items():
        point = float(v[0])
        low = high = math.nan
        reps = v[1:][~np.isnan(v[1:])]
        if len(reps):
            low, high = (float(q) for q in np.quantile(reps, [alpha, 1 - alpha]))
        out[name] = {k: (None if math.isnan(x) else x)
                     for k, x in (("value", point), ("ci_low", low), ("ci_high", high))}
    return out
