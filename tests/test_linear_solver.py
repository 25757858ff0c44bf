"""The linear head's solver (heads/logistic.py) against sklearn's LogisticRegression, on
both of its routes (all Cs in one batch; the warm-started path over C) and on rows as
nearly parallel as an untrained encoder's, where the solver used to crawl."""

from __future__ import annotations

import numpy as np
import pytest

from cxrembed.heads import make_head
from cxrembed.heads.base import single_thread
from cxrembed.heads.logistic import fit_logistic_path

DIM = 48
CHECKED = (0, 3)  # a common class and a rare one (sklearn's fits are what this file waits on)


def rows_and_labels(n: int, seed: int, parallel: float = 0.0):
    """Unit rows with a planted signal for 5 classes; ``parallel`` = squared cosine of
    every row with one shared direction (0.99: the geometry of cxr-tiny's stores)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 5)) < np.array([0.4, 0.2, 0.1, 0.05, 0.3])).astype(np.uint8)
    y[:5] = np.eye(5, dtype=np.uint8)
    y[5:10] = 0
    spread = rng.normal(size=(n, DIM)) * np.exp(-np.arange(DIM) / 8.0)
    x = spread + 1.5 * y @ rng.normal(size=(5, DIM)) * np.exp(-np.arange(DIM) / 8.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if parallel:
        x = np.sqrt(1 - parallel) * x + np.sqrt(parallel) * np.eye(DIM)[DIM - 1]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def sklearn_fit(x, y, C):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    model.fit(x, y)
    return model.coef_[0], model.intercept_[0]


@pytest.mark.parametrize("n, parallel", [(30, 0.0), (400, 0.0), (400, 0.99)],
                         ids=["fewer-rows-than-dims:batch", "more-rows:path",
                              "nearly-parallel-rows:path"])
def test_every_C_is_sklearns_optimum(n, parallel):
    x, y = rows_and_labels(n, seed=n, parallel=parallel)
    Cs = (100.0, 0.01, 1.0)  # any order
    with single_thread():
        W, b, info = fit_logistic_path(x, 2.0 * y - 1, Cs, tol=1e-9, max_iter=5000)
    assert info["converged"] and info["warm_starts"] == (n > DIM)
    assert W.shape == (3, DIM, 5) and b.shape == (3, 5)
    for j, C in enumerate(Cs):
        for c in CHECKED:
            coef, intercept = sklearn_fit(x, y[:, c], C)
            scale = max(1.0, np.abs(coef).max())
            np.testing.assert_allclose(W[j, :, c], coef, rtol=0, atol=1e-5 * scale)
            assert abs(b[j, c] - intercept) <= 1e-5 * max(scale, abs(intercept))


def test_default_tolerance_scores_as_sklearn_does():
    """At the head's own tolerance (1e-6) the decision values of new rows agree with
    sklearn's to 1e-3 of their spread, at every C and on both routes."""
    for n in (30, 400):
        x, y = rows_and_labels(n + 200, seed=7, parallel=0.9)
        with single_thread():
            W, b, _ = fit_logistic_path(x[:n], 2.0 * y[:n] - 1, (0.01, 1.0, 100.0))
        for j, C in enumerate((0.01, 1.0, 100.0)):
            for c in CHECKED:
                coef, intercept = sklearn_fit(x[:n], y[:n, c], C)
                ours, ref = x[n:] @ W[j, :, c] + b[j, c], x[n:] @ coef + intercept
                assert np.abs(ours - ref).max() <= 1e-3 * max(np.ptp(ref), 1e-3), (n, C, c)


def test_unknown_labels_are_left_out_as_if_the_rows_were_absent():
    x, y = rows_and_labels(300, seed=3)
    known = np.ones_like(y, dtype=bool)
    known[::4, 1] = False
    T = (2.0 * y - 1) * known
    with single_thread():
        W, b, _ = fit_logistic_path(x, T, (1.0,), tol=1e-9)
    # |w|^2 / (2 C n) + sum over known rows / n  is  C * n  times sklearn's problem on them
    coef, intercept = sklearn_fit(x[known[:, 1]], y[known[:, 1], 1], 1.0)
    np.testing.assert_allclose(W[0, :, 1], coef, atol=1e-5 * max(1.0, np.abs(coef).max()))
    assert abs(b[0, 1] - intercept) <= 1e-5 * max(1.0, abs(intercept))


def test_the_head_keeps_the_solution_of_the_C_it_selects():
    x, y = rows_and_labels(600, seed=5, parallel=0.99)
    y14 = np.zeros((600, 14), np.uint8)
    y14[:, :5] = y
    head = make_head("linear").fit(x[:400], y14[:400], x[400:], y14[400:])
    C = head.selected["C"]
    for c in CHECKED:
        coef, intercept = sklearn_fit(x[:400], y[:400, c], C)
        scale = max(1.0, np.abs(coef).max())
        np.testing.assert_allclose(head.coef_[:, c], coef, atol=2e-3 * scale)
    assert head.selected["unfittable"] == list(range(5, 14))


def test_predict_many_gives_each_heads_own_scores():
    x, y = rows_and_labels(200, seed=9)
    y14 = np.zeros((200, 14), np.uint8)
    y14[:, :5] = y
    heads = [make_head("linear", default_C=C).fit(x[:100], y14[:100]) for C in (0.1, 10.0)]
    queries = 3.0 * x[100:].astype(np.float32)  # any norm: scored as unit vectors
    many = type(heads[0]).predict_many(heads, queries)
    unit = x[100:] / np.linalg.norm(x[100:], axis=1, keepdims=True)
    for head, scores in zip(heads, many):
        assert scores.shape == (100, 14)
        np.testing.assert_allclose(scores, unit @ head.coef_ + head.intercept_, atol=1e-5)
    assert not np.allclose(many[0], many[1])
