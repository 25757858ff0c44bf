"""k nearest shots: each test vector's neighbours among the few-shot sample vote.

Neighbours are found with an exact FAISS inner-product index over the unit vectors of the
shots (cosine similarity). The ``k`` neighbours vote with weights
``softmax(similarity / temperature)``; the score of class c is the weighted share of
neighbours carrying c. With ``temperature`` large the vote is uniform; small, the nearest
shot dominates. The weights are positive, so a score is always in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError
from cxrembed.heads.base import build_config, check_known, check_xy, register_head, unit_rows


@dataclass
class KNNConfig:
    k: int = 10  # neighbours per query (all shots when fewer)
    temperature: float = 0.05  # softmax temperature on cosine similarity



def top_k(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest similarities of each row and their columns ``(n, k)``, columns in
    increasing order. Of shots tied at the k-th value, the earliest are taken.

    ``np.partition`` finds each row's k-th value (several times faster than
    ``np.argpartition`` on float32 rows); the shots at or above it are read off in column
    order, so the vote below adds them in an order that does not depend on the selection
    algorithm."""
    n, shots = similarity.shape
    if k >= shots:
        return similarity, np.broadcast_to(np.arange(shots), similarity.shape)
    similarity = np.ascontiguousarray(similarity)
    kth = np.partition(similarity, shots - k, axis=1)[:, shots - k]
    chosen = similarity >= kth[:, None]
    tied = np.flatnonzero(np.count_nonzero(chosen, axis=1) != k)
    if len(tied):  # more than k at or above the k-th value: keep the earliest tied shots
        first = np.argsort(-similarity[tied], axis=1, kind="stable")[:, :k]
        chosen[tied] = False
        chosen[tied[:, None], first] = True
    flat = np.flatnonzero(chosen)  # row by row, k each, columns in order
    return similarity.ravel()[flat].reshape(n, k), (flat % shots).reshape(n, k)


def vote_sums(similarity: np.ndarray, neighbours: np.ndarray, columns: np.ndarray,
              temperature: float) -> np.ndarray:
    """``(n, m)``: per query, the neighbours' rows of ``columns`` (shots x m) summed with
    weights ``exp((similarity - max) / temperature)``: one sparse (queries x shots, k per
    row) by dense product, each row's neighbours added in the order given."""
    import scipy.sparse as sp

    sim = similarity.astype(np.float64)
    w = np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature)
    n, k = neighbours.shape
    vote = sp.csr_matrix((w.ravel(), np.ascontiguousarray(neighbours).ravel(),
                          np.arange(0, n * k + 1, k)), shape=(n, len(columns)))
    return vote @ np.asarray(columns, dtype=np.float64)


def weighted_vote(similarity: np.ndarray, neighbours: np.ndarray, labels: np.ndarray,
                  temperature: float, known: np.ndarray | None = None) -> np.ndarray:
    """Scores ``(n, C)``: shares of the neighbours ``(n, k)`` (rows of ``labels``) positive
    for each class, weighted by ``softmax(similarity / temperature)`` over the k; with
    ``known`` (shots x C), of the neighbours whose label is known (0 where none is).

    The weights' total is summed by the same product as the votes and divided out at the
    end, so a query whose (known) neighbours all carry a class scores exactly 1, and
    exactly 0 when none does: equal votes stay exact ties for the AUC."""
    labels = np.asarray(labels, dtype=np.float64)
    n_classes = labels.shape[1]
    if known is None:
        sums = vote_sums(similarity, neighbours, np.hstack([labels, np.ones((len(labels), 1))]),
                         temperature)
        return sums[:, :n_classes] / sums[:, n_classes:]
    known = np.asarray(known, dtype=np.float64)
    sums = vote_sums(similarity, neighbours, np.hstack([labels * known, known]), temperature)
    votes, weight = sums[:, :n_classes], sums[:, n_classes:]
    return np.divide(votes, weight, out=np.zeros_like(votes), where=weight > 0)


@register_head("knn")
class KNNHead:
    """Similarity-weighted vote of the k nearest shots (FAISS exact inner product)."""

    input = "normalized"
    shares_similarity = True  # predict takes the sweep's query-shot cosines

    def __init__(self, seed: int = 0, **options: Any) -> None:
        self.config = build_config(KNNConfig, options, "knn")
        if self.config.k < 1 or self.config.temperature <= 0:
            raise ConfigError(f"knn needs k >= 1 and temperature > 0, got k={self.config.k}, "
                              f"temperature={self.config.temperature}")
        self.selected: dict[str, Any] = {}
        self._index = None
        self._labels: np.ndarray | None = None

    def fit(self, X: Any, Y: Any, X_val: Any = None, Y_val: Any = None, known: Any = None
            ) -> "KNNHead":
        """Index the shots (val is not used: nothing is tuned). ``known``: a neighbour whose
        label of a class is unknown has no vote on that class."""
        try:
            import faiss
        except ImportError:  # pragma: no cover - faiss-cpu is a dependency
            raise ConfigError("the knn head needs faiss: pip install faiss-cpu") from None
        X, Y = check_xy(X, Y)
        keys = unit_rows(X)
        self._index = faiss.IndexFlatIP(keys.shape[1])
        self._index.add(keys)
        self._labels = Y
        self._known = check_known(known, Y)
        self.selected = {"k": min(self.config.k, len(X)), "temperature": self.config.temperature}
        return self

    def neighbours(self, X: Any, similarity: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and shot indices ``(n, k)`` of each query's nearest shots.
        ``similarity``: the queries' cosine similarities to the shots ``(n, shots)``, in
        fit order, when the caller has them (the sweep shares them with Tip-Adapter):
        the k largest are taken from it instead of a FAISS search. The two paths agree
        except at exact ties for the k-th place (duplicate shots): :func:`top_k` keeps the
        earliest tied shots, FAISS's heap whichever it met first."""
        if self._index is None:
            raise ConfigError("knn head: call fit before predict")
        k = self.selected["k"]
        if similarity is not None:
            if similarity.shape[1] != self._index.ntotal:
                raise ConfigError(f"knn head: similarities to {similarity.shape[1]} shots "
                                  f"given, fitted on {self._index.ntotal}")
            return top_k(similarity, k)
        X, _ = check_xy(X)
        sim, idx = self._index.search(unit_rows(X), k)
        order = np.argsort(idx, axis=1)  # column order, as top_k gives them
        return np.take_along_axis(sim, order, axis=1), np.take_along_axis(idx, order, axis=1)

    def predict(self, X: Any, similarity: np.ndarray | None = None) -> np.ndarray:
        """``(n, 14)`` weighted share of neighbours positive for each class (``similarity``:
        see :meth:`neighbours`)."""
        sim, idx = self.neighbours(X, similarity)
        return weighted_vote(sim, idx, self._labels, self.config.temperature,
                             getattr(self, "_known", None))
