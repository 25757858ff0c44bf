"""One-vs-rest L2 logistic regression on unit vectors, C chosen on the few-shot val sample.

Each class is sklearn's ``LogisticRegression(C=C)`` problem (``0.5 |w|^2 + C * sum of log
losses``, intercept not penalised). The 14 classes times every candidate C are solved
together as one L-BFGS problem: the objective is a sum of independent terms, so its
minimum is each term's minimum, and one vectorised solve replaces ~100 small sklearn fits
per few-shot draw (the sweep runs thousands). A test checks the coefficients against
sklearn. The C with the best val mean AUC is kept (one C for all classes: a per-class
choice on a handful of val positives would mostly fit noise).

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


@dataclass
class LinearConfig:
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried
    default_C: float = 1.0  # used without a val sample (sklearn's default)
    max_iter: int = 1000
    tol: float = 1e-6  # L-BFGS projected-gradient tolerance on the scaled objective



def _lbfgs_columns(fg, theta: np.ndarray, max_iter: int, tol: float, memory: int = 10
                   ) -> tuple[np.ndarray, int, np.ndarray]:
    """Minimise K independent smooth convex functions at once: one L-BFGS per column.

    ``fg(theta (P, K)) -> (f (K,), grad (P, K))`` where column k of the gradient depends on
    column k of theta only. Every column keeps its own curvature history and its own
    Armijo backtracking step, so the result is what K separate solves would give.
    Returns theta, iterations, and which columns met ``max |grad| <= tol``.
    """
    f, g = fg(theta)
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    done = np.abs(g).max(axis=0) <= tol
    it = 0
    for it in range(1, max_iter + 1):
        if done.all():
            it -= 1
            break
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(history):
            a = rho * np.einsum("pk,pk->k", s, q)
            q -= a * y
            alphas.append(a)
        if history:
            s, y, rho = history[-1]
            yy = np.einsum("pk,pk->k", y, y)
            q *= np.where(rho > 0, 1.0 / np.maximum(rho * yy, 1e-300), 1.0)
        else:
            q /= np.maximum(np.abs(g).max(axis=0), 1.0)
        for (s, y, rho), a in zip(history, reversed(alphas)):
            b = rho * np.einsum("pk,pk->k", y, q)
            q += s * (a - b)
        p = -q
        slope = np.einsum("pk,pk->k", p, g)
        reset = slope >= 0  # not a descent direction: fall back to steepest descent
        if reset.any():
            p[:, reset] = -g[:, reset]
            slope[reset] = -np.einsum("pk,pk->k", g[:, reset], g[:, reset])
        p[:, done] = 0.0
        step = np.ones(theta.shape[1])
        for _ in range(40):
            trial = theta + step * p
            f_new, g_new = fg(trial)
            ok = (f_new <= f + 1e-4 * step * slope) | done
            if ok.all():
                break
            step = np.where(ok, step, 0.5 * step)
        s, y = trial - theta, g_new - g
        sy = np.einsum("pk,pk->k", s, y)
        history.append((s, y, np.where(sy > 1e-12, 1.0 / np.maximum(sy, 1e-300), 0.0)))
        if len(history) > memory:
            history.pop(0)
        theta, f, g = trial, f_new, g_new
        done |= np.abs(g).max(axis=0) <= tol
    return theta, it, done


def fit_logistic(X: np.ndarray, T: np.ndarray, C: np.ndarray, max_iter: int = 1000,
                 tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solve K independent L2 logistic regressions at once.

    ``X`` (n, D); ``T`` (n, K) targets in {-1, +1}; ``C`` (K,) inverse strengths. Returns
    ``W`` (D, K), ``b`` (K,) and solver info. Objective per problem (divided by ``C * n``
    for conditioning, which moves no minimum): ``|w|^2 / (2 C n) + mean log-loss``.
    """
    n, d_full = X.shape
    ridge = 1.0 / (np.asarray(C, dtype=np.float64) * n)
    # The optimal w lies in the row space of X (any component outside it only adds
    # penalty), so solve in that space: w = V u with X = U S V^T, exact and, with fewer
    # shots than dimensions, much smaller.
    _, sing, vt = np.linalg.svd(X, full_matrices=False)
    basis = vt[sing > sing[0] * 1e-10].T if len(sing) and sing[0] > 0 else np.zeros((d_full, 0))
    d = basis.shape[1]
    Xb = np.hstack([X @ basis, np.ones((n, 1))])  # last row of theta: the intercept

    def objective(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        margin = T * (Xb @ theta)
        w = theta[:d]
        loss = np.logaddexp(0.0, -margin).sum(axis=0) / n + 0.5 * ridge * (w * w).sum(axis=0)
        G = -T * np.exp(-np.logaddexp(0.0, margin)) / n  # d loss / d z = -t * sigmoid(-m)
        grad = Xb.T @ G
        grad[:d] += ridge * w
        return loss, grad

    theta, iterations, converged = _lbfgs_columns(
        objective, np.zeros((d + 1, T.shape[1])), max_iter, tol)
    info = {"iterations": int(iterations), "converged": bool(converged.all())}
    return basis @ theta[:d], theta[d], info


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
        T_all = np.tile(T, (1, len(Cs)))
        C_all = np.repeat(np.asarray(Cs, dtype=np.float64), len(fittable))
        W, b, info = fit_logistic(X, T_all, C_all, self.config.max_iter, self.config.tol)

        def head_for(j: int) -> tuple[np.ndarray, np.ndarray]:
            coef = np.zeros((X.shape[1], n_classes))
            intercept = np.zeros(n_classes)
            cols = slice(j * len(fittable), (j + 1) * len(fittable))
            coef[:, fittable], intercept[fittable] = W[:, cols], b[cols]
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
        if self.coef_ is None:
            raise ConfigError("linear head: call fit before predict")
        X, _ = check_xy(X)
        scores = (X @ self.coef_.astype(np.float32)) * inverse_norms(X)
        return scores.astype(np.float64) + self.intercept_
