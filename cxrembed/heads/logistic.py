"""Many L2 logistic regressions on one data matrix, solved together: the linear head's solver.

Each problem is sklearn's ``LogisticRegression(C=C)`` (``0.5 |w|^2 + C * sum of log losses``,
intercept not penalised), divided by ``C * n`` (which moves no minimum):
``|w|^2 / (2 C n) + mean log-loss``. Problems share the rows ``X`` and differ in their
targets and their C, so the solver works on all of them at once, column by column.

What makes it fast, every step exact (the minimum is the same one):

* **Row space, centred.** The optimal ``w`` lies in the span of the centred rows (a part
  outside it only shifts every score by a constant, which the free intercept absorbs, and
  adds penalty). With ``X - mean = U S V^T``, ``w = V theta`` and the features become
  ``U S``: as many as the rank (``n`` with fewer shots than dimensions), and orthogonal to
  the intercept's column of ones.
* **Preconditioned.** In those coordinates the Hessian at ``w = 0`` is diagonal:
  ``S^2 / (4 n) + 1 / (C n)`` for ``theta`` and ``1/4`` for the intercept. L-BFGS runs in
  coordinates where that Hessian is the identity, so embeddings whose rows are nearly
  parallel (an untrained encoder's: mean cosine 0.99) cost no more than spread-out ones.
* **A path over C.** :func:`fit_logistic_path` solves the Cs in increasing order, each
  started from the previous C's solution (sklearn's ``logistic_regression_path`` does the
  same); on many rows the solutions for C = 1 .. 100 barely differ.
* **Active columns only.** A column that has converged leaves the batch, and a column whose
  step fails the Armijo test is the only one evaluated again.

Stopping rule: ``max |gradient| <= tol`` of the scaled objective in the coordinates
``(theta, intercept of the centred rows)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class RowSpace:
    """The centred row space of ``X``: ``design = [(X - mean) @ basis, 1]`` (n, r+1), its
    first r columns orthogonal with norms ``singular`` and orthogonal to the last (ones);
    ``w = basis @ theta[:-1]`` and ``b = theta[-1] - mean @ w``."""

    design: np.ndarray  # (n, r + 1): U S, then a column of ones
    singular: np.ndarray  # (r,)
    basis: np.ndarray  # (D, r) = V
    mean: np.ndarray  # (D,)

    @classmethod
    def of(cls, X: np.ndarray, block: int = 8192) -> "RowSpace":
        X = np.asarray(X, dtype=np.float64)
        mean = X.mean(axis=0)
        n, d = X.shape
        blocks = [slice(start, start + block) for start in range(0, n, block)]
        if n >= d:  # many rows: eigenvectors of the (D, D) Gram matrix, in row blocks
            gram = np.zeros((d, d))
            for rows in blocks:
                centred = X[rows] - mean
                gram += centred.T @ centred
            eig, vecs = np.linalg.eigh(gram)
            basis = vecs[:, eig > max(eig[-1], 0.0) * 1e-20][:, ::-1]
        else:
            _, sing, vt = np.linalg.svd(X - mean, full_matrices=False)
            keep = sing > sing[0] * 1e-10 if len(sing) and sing[0] > 0 else sing > 0
            basis = vt[keep].T
        design = np.empty((n, basis.shape[1] + 1))
        for rows in blocks:
            np.matmul(X[rows] - mean, basis, out=design[rows, :-1])
        design[:, -1] = 1.0
        singular = np.sqrt(np.einsum("ij,ij->j", design[:, :-1], design[:, :-1]))
        return cls(design, singular, basis, mean)

    def coefficients(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``W`` (D, K) and ``b`` (K,) in the original coordinates from ``theta`` (r+1, K)."""
        w = self.basis @ theta[:-1]
        return w, theta[-1] - self.mean @ w

    def curvature(self, T: np.ndarray, theta: np.ndarray, block: int = 8192) -> np.ndarray:
        """The diagonal of the mean log-loss Hessian at ``theta``, (r+1, K): each row weighs
        ``sigmoid(m) sigmoid(-m)`` there. In row blocks (no (n, r+1) temporary); float32,
        as it only shapes the steps, never the optimum."""
        out = np.zeros(theta.shape)
        for start in range(0, len(T), block):
            rows = self.design[start:start + block]
            margin = T[start:start + block] * (rows @ theta)
            with np.errstate(over="ignore"):  # cosh overflows to inf: weight 0, as it should
                weight = np.abs(T[start:start + block]) / (2.0 + 2.0 * np.cosh(margin))
            squared = np.square(rows, dtype=np.float32)
            out += squared.T @ weight.astype(np.float32)
        return out / len(T)


def _objective(space: RowSpace, T: np.ndarray, ridge: np.ndarray, scale: np.ndarray
               ) -> Objective:
    """``fg(u (P, k), cols) -> (f (k,), grad_u (P, k))`` for the columns ``cols``, in the
    preconditioned coordinates ``u = theta * scale``."""
    Z = space.design
    n, r = len(T), Z.shape[1] - 1

    def fg(u: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = len(cols) == T.shape[1]
        t = T if full else T[:, cols]
        s = scale if full else scale[:, cols]
        lam = ridge if full else ridge[cols]
        theta = u / s
        margin = Z @ theta
        margin *= t
        e = np.exp(-np.abs(margin))
        loss = np.log1p(e)
        loss += np.maximum(-margin, 0.0)
        # d loss / d z = -t * sigmoid(-margin), sigmoid(-m) = e/(1+e) for m >= 0, 1/(1+e) else
        sig = np.where(margin >= 0, e, 1.0)
        sig /= 1.0 + e
        sig *= t
        w = theta[:r]
        f = loss.sum(axis=0) / n + 0.5 * lam * np.einsum("pk,pk->k", w, w)
        grad = Z.T @ sig
        grad *= -1.0 / n
        grad[:r] += lam * w
        grad /= s
        return f, grad

    return fg


def _two_loop(g: np.ndarray, history: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
              ) -> np.ndarray:
    """L-BFGS direction ``-H g`` per column, each column with its own curvature pairs."""
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
    for (s, y, rho), a in zip(history, reversed(alphas)):
        q += s * (a - rho * np.einsum("pk,pk->k", y, q))
    return -q


def lbfgs_columns(fg: Objective, u: np.ndarray, gscale: np.ndarray, max_iter: int,
                  tol: float, memory: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise K independent smooth convex functions at once: one L-BFGS per column.

    ``fg(u, cols)`` evaluates the columns ``cols`` only. A column stops when
    ``max |grad * gscale| <= tol`` (``gscale`` maps the gradient back to the coordinates
    the tolerance is stated in) and then leaves the batch. Each column keeps its own
    curvature pairs and its own Armijo backtracking, so the result is what K separate
    solves would give. Returns ``u``, iterations per column, converged per column.
    """
    u = np.array(u, dtype=np.float64)
    n_cols = u.shape[1]
    result = u.copy()
    iterations = np.zeros(n_cols, np.int64)
    converged = np.zeros(n_cols, bool)
    cols = np.arange(n_cols)
    f, g = fg(u, cols)
    stalled = np.zeros(n_cols, bool)
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for it in range(max_iter + 1):
        met = np.abs(g * gscale[:, cols]).max(axis=0) <= tol
        done = met | stalled
        if done.any() or it == max_iter:
            result[:, cols] = u
            iterations[cols] = it
            converged[cols[met]] = True
            keep = ~done
            if it == max_iter or not keep.any():
                break
            cols, u, g, f = cols[keep], u[:, keep], g[:, keep], f[keep]
            history = [(s[:, keep], y[:, keep], rho[keep]) for s, y, rho in history]
        p = _two_loop(g, history) if history else -g
        slope = np.einsum("pk,pk->k", p, g)
        uphill = slope >= 0  # not a descent direction: fall back to steepest descent
        if uphill.any():
            p[:, uphill] = -g[:, uphill]
            slope[uphill] = -np.einsum("pk,pk->k", g[:, uphill], g[:, uphill])
        # Armijo, with the objective's rounding error as slack: near the optimum the
        # decrease can be smaller than the error of a sum of n log-losses
        slack = 1e-12 * np.abs(f)
        trial = u + p
        f_new, g_new = fg(trial, cols)
        step = np.ones(len(cols))
        failed = np.flatnonzero(f_new > f + 1e-4 * slope + slack)
        for _ in range(30):
            if not len(failed):
                break
            step[failed] *= 0.5
            trial[:, failed] = u[:, failed] + step[failed] * p[:, failed]
            f_try, g_try = fg(trial[:, failed], cols[failed])
            f_new[failed], g_new[:, failed] = f_try, g_try
            failed = failed[f_try > (f + 1e-4 * step * slope + slack)[failed]]
        stalled = np.zeros(len(cols), bool)
        stalled[failed] = True  # no decrease left to find: stop there, not converged
        trial[:, failed], f_new[failed], g_new[:, failed] = u[:, failed], f[failed], g[:, failed]
        s, y = trial - u, g_new - g
        sy = np.einsum("pk,pk->k", s, y)
        history.append((s, y, np.where(sy > 1e-12, 1.0 / np.maximum(sy, 1e-300), 0.0)))
        if len(history) > memory:
            history.pop(0)
        u, f, g = trial, f_new, g_new
    return result, iterations, converged


def _solve(space: RowSpace, T: np.ndarray, C: np.ndarray, theta0: np.ndarray | None,
           max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``theta`` (r+1, K) of the K problems (targets ``T``, strengths ``C``), from ``theta0``."""
    n = len(T)
    ridge = 1.0 / (np.asarray(C, dtype=np.float64) * n)
    if theta0 is None:  # the Hessian's diagonal at w = 0 (every sigmoid 1/2: 1/4 a row)
        curvature = np.vstack([(space.singular ** 2 / (4.0 * n))[:, None] + ridge[None, :],
                               np.full((1, len(ridge)), 0.25)])
    else:  # ... and at the start, where the previous C ended
        curvature = space.curvature(T, theta0)
        curvature[:-1] += ridge
        curvature[-1] = np.maximum(curvature[-1], 1e-12)
    scale = np.sqrt(curvature)
    start = np.zeros_like(scale) if theta0 is None else theta0 * scale
    u, iterations, converged = lbfgs_columns(_objective(space, T, ridge, scale), start,
                                             scale, max_iter, tol)
    return u / scale, iterations, converged


def fit_logistic(X: np.ndarray, T: np.ndarray, C: np.ndarray, max_iter: int = 1000,
                 tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solve K independent L2 logistic regressions at once, from zero.

    ``X`` (n, D); ``T`` (n, K) targets in {-1, +1} (0: left out); ``C`` (K,) inverse
    strengths. Returns ``W`` (D, K), ``b`` (K,) and solver info.
    """
    space = RowSpace.of(X)
    theta, iterations, converged = _solve(space, np.asarray(T, np.float64), C, None,
                                          max_iter, tol)
    W, b = space.coefficients(theta)
    return W, b, {"iterations": int(iterations.max(initial=0)),
                  "converged": bool(converged.all())}


def fit_logistic_path(X: np.ndarray, T: np.ndarray, Cs: Any, max_iter: int = 1000,
                      tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The K problems of targets ``T`` (n, K) at every C of ``Cs``: ``W`` (len(Cs), D, K),
    ``b`` (len(Cs), K), each C's own optimum.

    With more rows than dimensions the Cs are solved in increasing order, each started
    from the previous one's solution and preconditioned by the Hessian's diagonal there
    (the solutions are close, and the curvature there is the curvature of the end);
    with fewer, all Cs go in one batch from zero (each problem is cheap, and one batch
    takes a fifth of the Python-level steps).
    """
    space = RowSpace.of(X)
    T = np.asarray(T, np.float64)
    Cs = np.asarray(Cs, dtype=np.float64)
    n, k = T.shape
    if n <= X.shape[1] or len(Cs) == 1:
        theta, iterations, converged = _solve(space, np.tile(T, (1, len(Cs))),
                                              np.repeat(Cs, k), None, max_iter, tol)
        W, b = space.coefficients(theta)
        return (W.reshape(-1, len(Cs), k).transpose(1, 0, 2), b.reshape(len(Cs), k),
                {"iterations": int(iterations.max(initial=0)), "converged": bool(converged.all()),
                 "warm_starts": False})
    W = np.zeros((len(Cs), space.basis.shape[0], k))
    b = np.zeros((len(Cs), k))
    theta, most, ok = None, 0, True
    for j in np.argsort(Cs, kind="stable"):
        theta, iterations, converged = _solve(space, T, np.full(k, Cs[j]), theta, max_iter, tol)
        W[j], b[j] = space.coefficients(theta)
        most, ok = max(most, int(iterations.max(initial=0))), ok and bool(converged.all())
    return W, b, {"iterations": most, "converged": ok, "warm_starts": True}
