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



def weighted_vote(similarity: np.ndarray, neighbours: np.ndarray, labels: np.ndarray,
                  temperature: float) -> np.ndarray:
    """Scores ``(n, C)``: shares of the neighbours ``(n, k)`` (rows of ``labels``) positive
    for each class, weighted by ``softmax(similarity / temperature)`` over the k."""
    sim = similarity.astype(np.float64)
    w = np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature)
    w /= w.sum(axis=1, keepdims=True)
    out = np.zeros((len(neighbours), labels.shape[1]))
    for j in range(neighbours.shape[1]):  # k passes over (n, C): no (n, k, C) temporary
        out += w[:, j:j + 1] * labels[neighbours[:, j]]
    return out


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
        the k largest are taken from it instead of a FAISS search."""
        if self._index is None:
            raise ConfigError("knn head: call fit before predict")
        k = self.selected["k"]
        if similarity is not None:
            if similarity.shape[1] != self._index.ntotal:
                raise ConfigError(f"knn head: similarities to {similarity.shape[1]} shots "
                                  f"given, fitted on {self._index.ntotal}")
            if k == similarity.shape[1]:
                return similarity, np.broadcast_to(np.arange(k), similarity.shape)
            idx = np.argpartition(similarity, -k, axis=1)[:, -k:]
            return np.take_along_axis(similarity, idx, axis=1), idx
        X, _ = check_xy(X)
        query = unit_rows(X)
        return self._index.search(query, k)

    def predict(self, X: Any, similarity: np.ndarray | None = None) -> np.ndarray:
        """``(n, 14)`` weighted share of neighbours positive for each class (``similarity``:
        see :meth:`neighbours`)."""
        sim, idx = self.neighbours(X, similarity)
        if getattr(self, "_known", None) is None:
            return weighted_vote(sim, idx, self._labels, self.config.temperature)
        known = self._known.astype(np.float64)
        votes = weighted_vote(sim, idx, self._labels * known, self.config.temperature)
        weight = weighted_vote(sim, idx, known, self.config.temperature)
        return np.divide(votes, weight, out=np.zeros_like(votes), where=weight > 0)
