"""Per-class ROC AUC, macro mean, and patient-level (cluster) bootstrap intervals.

Conventions a reader can rely on:

* ``per_class_auc`` equals :func:`sklearn.metrics.roc_auc_score` column by column (ties
  count one half). A class with no positives or no negatives has no AUC: it is NaN with an
  :class:`UndefinedAUCWarning`, never 0.5, and :func:`mean_auc` leaves it out (warning).
* Unknown labels (``known`` False, e.g. CheXpert's uncertain under ``--uncertain ignore``)
  are left out of their class's AUC: for class ``c`` only the rows with ``known[:, c]``
  count, as if the others were not there (never as negatives).
* ``bootstrap_auc`` resamples *patients* with replacement and takes all of each drawn
  patient's rows (images of one patient are correlated; resampling rows would give
  intervals that are too narrow). Seeded, 1,000 resamples by default, percentile intervals.

Implementation: :func:`cxrembed.mannwhitney.weighted_aucs` (one sort per class, then the
weighted Mann-Whitney statistic of every resample of every class from one sparse by dense
product, exact). Weights all equal to one give the point estimate through the same code, so
the point estimate and the replicates cannot disagree on tie handling.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.labels import LABELS
from cxrembed.mannwhitney import weighted_aucs

log = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


class UndefinedAUCWarning(UserWarning):
    """A class has no positives or no negatives in the rows scored: its AUC is undefined."""


# ---------------------------------------------------------------------------------------
# Input checks


def _as_2d(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim != 2 or y.shape != s.shape:
        raise DataError(f"labels of shape {np.shape(y_true)} and scores of shape "
                        f"{np.shape(scores)} do not match; expected two (n, classes) arrays")
    valid = y.dtype == bool or ((y == 0) | (y == 1)).all()  # (np.isin: ~20x slower)
    if y.size and not valid:
        bad = y[~np.isin(y, (0, 1))].ravel()[0]
        raise DataError(f"labels must be 0/1; found {bad!r} (unknown labels must be removed "
                        "before scoring)")
    if not np.isfinite(s).all():
        row, col = np.argwhere(~np.isfinite(s))[0]
        raise DataError(f"score at row {row}, class {col} is {s[row, col]}; scores must be "
                        "finite")
    return y.astype(bool), s


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is not None and len(names) == n:
        return list(names)
    if n == len(LABELS):
        return list(LABELS)
    return [f"class {i}" for i in range(n)]


def _warn_undefined(auc: np.ndarray, names: Sequence[str] | None, y: np.ndarray | None,
                    stacklevel: int = 3, known: np.ndarray | None = None) -> None:
    undefined = np.flatnonzero(np.isnan(auc))
    if not len(undefined):
        return
    names = _names(names, len(auc))
    parts = []
    for i in undefined:
        if y is not None:
            rows = y[:, i] if known is None else y[known[:, i], i]
            pos = int(rows.sum())
            parts.append(f"{names[i]} ({pos} positives, {len(rows) - pos} negatives)")
        else:
            parts.append(names[i])
    warnings.warn(f"AUC undefined for {', '.join(parts)}: reported as NaN and left out of "
                  "the mean", UndefinedAUCWarning, stacklevel=stacklevel)


def _patient_index(patient_id: Any, n: int) -> tuple[np.ndarray, int]:
    pid = np.asarray(patient_id)
    if pid.shape != (n,):
        raise DataError(f"patient_id has shape {pid.shape}; expected one id per row ({n},)")
    _, index = np.unique(pid, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1 if n else 0


def _known_mask(known: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The known-label mask as bool ``(n, C)``, or None when every label is known."""
    if known is None:
        return None
    mask = np.asarray(known, dtype=bool)
    if mask.ndim == 1:
        mask = mask[:, None]
    if mask.shape != shape:
        raise DataError(f"known-label mask of shape {mask.shape} does not match labels "
                        f"{shape}")
    return None if mask.all() else mask


def _by_class(known: np.ndarray, whole: Any, one: Any) -> list:
    """Results of ``whole(columns)`` for the fully known classes (together, one call) and
    ``one(c, rows)`` for each class with unknown rows (on its known rows only)."""
    full = np.flatnonzero(known.all(axis=0))
    parts = [(full, whole(full))] if len(full) else []
    for c in np.flatnonzero(~known.all(axis=0)):
        parts.append((np.array([c]), one(c, np.flatnonzero(known[:, c]))))
    return parts


# ---------------------------------------------------------------------------------------
# Public API


def per_class_auc(y_true: Any, scores: Any, *, names: Sequence[str] | None = None,
                  warn: bool = True, known: Any = None) -> np.ndarray:
    """ROC AUC of each column, float64 ``(classes,)``; NaN (with a warning) where undefined.

    Equal to ``sklearn.metrics.roc_auc_score(y_true[:, c], scores[:, c])`` for every class
    that has both positives and negatives; with ``known`` (bool, like ``y_true``), on the
    rows whose label of that class is known.
    """
    y, s = _as_2d(y_true, scores)
    mask = _known_mask(known, y.shape)
    auc = weighted_aucs(y, s, np.arange(len(y)), np.ones((len(y), 1), np.float32), mask)[0]
    if warn:
        _warn_undefined(auc, names, y, known=mask)
    return auc


def mean_auc(aucs: Any, *, names: Sequence[str] | None = None, warn: bool = True) -> float:
    """Macro mean of per-class AUCs over the defined ones (NaN excluded, with a warning).

    NaN when no class is defined.
    """
    aucs = np.asarray(aucs, dtype=np.float64)
    defined = ~np.isnan(aucs)
    if warn and not defined.all():
        names = _names(names, len(aucs))
        left_out = [names[i] for i in np.flatnonzero(~defined)]
        warnings.warn(f"mean AUC over {int(defined.sum())} of {len(aucs)} classes; left out "
                      f"(undefined): {', '.join(left_out)}", UndefinedAUCWarning, stacklevel=2)
    if not defined.any():
        return float("nan")
    return float(aucs[defined].mean())


def resample_patients(n_patients: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                      ) -> np.ndarray:
    """How many times each patient is drawn in each resample: float64 ``(patients, B)``.

    Each resample draws ``n_patients`` patients with replacement (a multinomial draw).
    """
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be at least 1, got {n_resamples}")
    if n_patients < 1:
        raise DataError("no patients to resample")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    flat = (draws + np.arange(n_resamples)[:, None] * n_patients).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n_patients)
    return np.ascontiguousarray(counts.reshape(n_resamples, n_patients).T, dtype=np.float64)


def replicate_aucs(y_true: Any, scores: Any, patient_index: np.ndarray,
                   weights: np.ndarray, known: Any = None, device: Any = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Point AUCs ``(C,)`` and the AUCs of every resample ``(B, C)``, all classes at once.

    ``patient_index`` maps rows to ``0..P-1``; ``weights`` is ``(P, B)`` as from
    :func:`resample_patients`. NaN marks an undefined class (point or replicate). Quiet:
    callers decide what to warn about. Both are exact (see :func:`weighted_aucs`).
    ``known`` leaves unknown labels out of their class (see :func:`per_class_auc`).
    ``device`` (a torch device: "cuda", or "cpu" to test that path) computes them with
    :func:`weighted_aucs_torch` instead of numpy.
    """
    y, s = _as_2d(y_true, scores)
    mask = _known_mask(known, y.shape)
    index = np.asarray(patient_index).reshape(-1)
    if mask is not None and device is not None:  # the torch path takes one mask at a time
        point, reps = np.empty(y.shape[1]), np.empty((weights.shape[1], y.shape[1]))
        for cols, (p, r) in _by_class(
                mask, lambda cols: replicate_aucs(y[:, cols], s[:, cols], index, weights,
                                                  device=device),
                lambda c, rows: replicate_aucs(y[rows, c], s[rows, c], index[rows], weights,
                                               device=device)):
            point[cols], reps[:, cols] = p, r
        return point, reps
    n_patients = weights.shape[0]
    # Column 0 weights every patient once: the point estimate, through the same code path.
    w = np.empty((n_patients, weights.shape[1] + 1), np.float32)
    w[:, 0] = 1.0
    w[:, 1:] = weights
    out = (weighted_aucs(y, s, index, w, mask) if device is None
           else weighted_aucs_torch(y, s, index, w, device))
    return out[0], out[1:]


# ---------------------------------------------------------------------------------------
# The weighted Mann-Whitney statistic on a torch device


def weighted_aucs_torch(y: np.ndarray, s: np.ndarray, patient: np.ndarray, weights: Any,
                        device: Any = "cpu", block: int = 256) -> np.ndarray:
    """:func:`weighted_aucs` with torch on ``device`` (a GPU; tested on the CPU): per
    class, rows sorted once, the weights of each row gathered, summed per tie group, and
    the Mann-Whitney sum taken over groups, ``block`` weightings at a time, in float64."""
    import torch

    w_all = torch.as_tensor(weights, device=device, dtype=torch.float64)
    st = torch.as_tensor(np.ascontiguousarray(s.T), device=device, dtype=torch.float64)
    yt = torch.as_tensor(np.ascontiguousarray(y.T), device=device).bool()
    pt = torch.as_tensor(patient, device=device, dtype=torch.long)
    out = torch.empty((y.shape[1], w_all.shape[1]), dtype=torch.float64, device=device)
    for c in range(y.shape[1]):
        values, order = torch.sort(st[c])
        new_group = torch.ones_like(values, dtype=torch.long)
        new_group[1:] = (values[1:] != values[:-1]).long()
        group = torch.cumsum(new_group, 0) - 1
        n_groups = int(group[-1]) + 1 if len(group) else 0
        pos = yt[c][order]
        for lo in range(0, w_all.shape[1], block):
            rows_w = w_all[pt[order], lo:lo + block]  # (n, block)
            pos_g = torch.zeros((n_groups, rows_w.shape[1]), dtype=torch.float64, device=device)
            neg_g = torch.zeros_like(pos_g)
            pos_g.index_add_(0, group[pos], rows_w[pos])
            neg_g.index_add_(0, group[~pos], rows_w[~pos])
            below = torch.cumsum(neg_g, 0) - neg_g + 0.5 * neg_g
            u = (pos_g * below).sum(0)
            denom = pos_g.sum(0) * neg_g.sum(0)
            out[c, lo:lo + block] = torch.where(denom > 0, u / torch.where(denom > 0, denom, 1.0),
                                                torch.nan)
    return out.T.cpu().numpy()


@dataclass(frozen=True)
class BootstrapCI:
    """Per-class AUCs with percentile intervals, and the macro mean with its interval."""

    names: tuple[str, ...]
    auc: np.ndarray  # (C,) point estimates, NaN where undefined
    low: np.ndarray  # (C,)
    high: np.ndarray  # (C,)
    mean_auc: float
    mean_low: float
    mean_high: float
    n_resamples: int
    level: float
    seed: int
    n_patients: int
    #: resamples in which each class's AUC was defined (the interval uses only those)
    defined: np.ndarray  # (C,) int
    #: resamples in which every class defined at the point was defined (for the mean)
    defined_mean: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{class: {auc, low, high}}``, the mean, and how it was resampled."""
        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "per_class": {n: {"auc": num(a), "low": num(lo), "high": num(hi)}
                          for n, a, lo, hi in zip(self.names, self.auc, self.low, self.high)},
            "mean_auc": {"auc": num(self.mean_auc), "low": num(self.mean_low),
                         "high": num(self.mean_high)},
            "bootstrap": {"unit": "patient", "n_resamples": self.n_resamples,
                          "level": self.level, "seed": self.seed,
                          "n_patients": self.n_patients,
                          "defined": {n: int(d) for n, d in zip(self.names, self.defined)},
                          "defined_mean": self.defined_mean},
        }


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN replicates; NaN where none is defined."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be between 0 and 1, got {level}")
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN, on purpose
        low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return low, high


def macro_replicates(point: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Macro mean of each replicate over the classes defined at the point estimate.

    A replicate where one of those classes is undefined is NaN (dropped), so every
    replicate averages the same classes as the point estimate.
    """
    defined = ~np.isnan(point)
    if not defined.any():
        return np.full(len(replicates), np.nan)
    return replicates[:, defined].mean(axis=1)  # NaN propagates: dropped later


def bootstrap_auc(y_true: Any, scores: Any, patient_id: Any, *,
                  n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0, names: Sequence[str] | None = None, warn: bool = True,
                  known: Any = None) -> BootstrapCI:
    """Per-class and mean AUC with patient-level bootstrap percentile intervals.

    Each of ``n_resamples`` resamples draws as many patients as there are, with
    replacement, and takes every row of each drawn patient (as many times as drawn).
    ``known`` leaves unknown labels out of their class (see :func:`per_class_auc`).
    """
    y, s = _as_2d(y_true, scores)
    index, n_patients = _patient_index(patient_id, len(y))
    weights = resample_patients(n_patients, n_resamples, seed)
    point, reps = replicate_aucs(y, s, index, weights, known=known)
    if warn:
        mask = _known_mask(known, y.shape)
        _warn_undefined(point, names, y, known=mask)
    low, high = percentile_interval(reps, level)
    low[np.isnan(point)] = high[np.isnan(point)] = np.nan
    macro = macro_replicates(point, reps)
    mean_low, mean_high = percentile_interval(macro[:, None], level)
    n_defined = (~np.isnan(reps)).sum(axis=0)
    defined_mean = int((~np.isnan(macro)).sum())
    if warn and defined_mean < n_resamples:
        warnings.warn(f"{n_resamples - defined_mean} of {n_resamples} resamples lacked the "
                      "positives or negatives of some class and were left out of the mean's "
                      "interval", UndefinedAUCWarning, stacklevel=2)
    return BootstrapCI(
        names=tuple(_names(names, y.shape[1])), auc=point, low=low, high=high,
        mean_auc=mean_auc(point, warn=False), mean_low=float(mean_low[0]),
        mean_high=float(mean_high[0]), n_resamples=n_resamples, level=level, seed=seed,
        n_patients=n_patients, defined=n_defined, defined_mean=defined_mean)
