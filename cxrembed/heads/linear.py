"""One-vs-rest L2 logistic regression on unit vectors, C chosen on the few-shot val sample.

Each class is sklearn's ``LogisticRegression(C=C)`` problem (``0.5 |w|^2 + C * sum of log
losses``, intercept not penalised). The 14 classes times every candidate C are solved
together by :mod:`cxrembed.heads.logistic` (a preconditioned, column-batched L-BFGS along
the path of Cs), which replaces ~100 small sklearn fits per few-shot draw (the sweep runs
thousands) and keeps fits on every train row of a large store short. Tests check the
coefficients against sklearn. The C with the best val mean AUC is kept (one C for all
classes: a per-class choice on a handful of val positives would mostly fit noise).

A class with no positive (or no negative) shot cannot be fitted; it gets a constant score,
which ranks nothing (test AUC 0.5, honestly so), and is listed in ``selected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError
from cxrembed.heads.base import (build_config, check_known, check_xy, has_val,
                                 inverse_norms, register_head, single_thread, unit_rows,
                                 val_mean_aucs)
from cxrembed.heads.logistic import fit_logistic, fit_logistic_path

__all__ = ["LinearConfig", "LinearHead", "fit_logistic", "fit_logistic_path"]


@dataclass
class LinearConfig:
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried
    default_C: float = 1.0  # used without a val sample (sklearn's default)
    max_iter: int = 1000
    tol: float = 1e-6  # max |gradient| of the objective divided by C n (heads/logistic.py)


@register_head("linear")
class LinearHead:
    """One-vs-rest logistic regression (L2), C chosen on val by mean AUC."""

    input = "normalized"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        self.config = build_config(LinearConfig, options, "linear")
        if not self.config.Cs or min(self.config.Cs) <= 0 or self.config.default_C <= 0:
            raise ConfigError(f"linear head: every C must be > 0, got {self.config.Cs}")
        self.selected: dict[str, Any] = {}
        self.coef_: np.ndarray | None = None  # (D, 14)
        self.intercept_: np.ndarray | None = None  # (14,)

    def fit(self, X: Any, Y: Any, X_val: Any = None, Y_val: Any = None, known: Any = None
            ) -> "LinearHead":
        """Fit every candidate C at once; keep the one with the best val mean AUC.
        ``known``: unknown labels are left out (a zero target: no loss gradient)."""
        with single_thread():  # small products: one BLAS thread is faster
            return self._fit(X, Y, X_val, Y_val, known)

    def _fit(self, X: Any, Y: Any, X_val: Any, Y_val: Any, known: Any = None) -> "LinearHead":
        X, Y = check_xy(X, Y)
        X = unit_rows(X, np.float64)
        mask = check_known(known, Y)
        n_classes = Y.shape[1]
        sure = np.ones(Y.shape, dtype=bool) if mask is None else mask
        pos = (Y.astype(bool) & sure).sum(axis=0)
        neg = (~Y.astype(bool) & sure).sum(axis=0)
        fittable = np.flatnonzero((pos > 0) & (neg > 0))
        use_val = has_val(X_val, Y_val)
        Cs = tuple(self.config.Cs) if use_val else (self.config.default_C,)
        T = 2.0 * Y[:, fittable].astype(np.float64) - 1.0
        T *= sure[:, fittable]  # an unknown label: target 0, constant loss, no gradient
        W, b, info = fit_logistic_path(X, T, Cs, self.config.max_iter, self.config.tol)

        def head_for(j: int) -> tuple[np.ndarray, np.ndarray]:
            coef = np.zeros((X.shape[1], n_classes))
            intercept = np.zeros(n_classes)
            coef[:, fittable], intercept[fittable] = W[j], b[j]
            return coef, intercept

        best_j, best_auc = 0, None
        if use_val:
            X_val, Y_val = check_xy(X_val, Y_val, "X_val")
            X_val = unit_rows(X_val, np.float64)
            aucs = val_mean_aucs(Y_val, [X_val @ coef + intercept
                                         for coef, intercept in map(head_for, range(len(Cs)))])
            for j, auc in enumerate(aucs):
                if not np.isnan(auc) and (best_auc is None or auc > best_auc):
                    best_j, best_auc = j, auc
        self.coef_, self.intercept_ = head_for(best_j)
        self.selected = {
            "C": Cs[best_j], "by": "val" if best_auc is not None else "default",
            "val_mean_auc": None if best_auc is None else float(best_auc),
            "unfittable": [int(c) for c in np.setdiff1d(np.arange(n_classes), fittable)],
            **info,
        }
        return self

    def predict(self, X: Any) -> np.ndarray:
        """``(n, 14)`` decision values ``x . w + b`` (monotone in the probability)."""
        return self.predict_many([self], X)[0]

    @classmethod
    def predict_many(cls, heads: list["LinearHead"], X: Any) -> list[np.ndarray]:
        """Every head's decision values on the same ``X``: the input is checked and its
        norms computed once, and one product serves every head (the sweep's seeds)."""
        if any(h.coef_ is None for h in heads):
            raise ConfigError("linear head: call fit before predict")
        X, _ = check_xy(X)
        coef = np.concatenate([h.coef_ for h in heads], axis=1).astype(np.float32)
        scores = ((X @ coef) * inverse_norms(X)).astype(np.float64)
        width = heads[0].coef_.shape[1]
        return [scores[:, i * width:(i + 1) * width] + h.intercept_
                for i, h in enumerate(heads)]
