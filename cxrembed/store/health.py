"""Embedding health: are the vectors spread out, or collapsed onto one direction?

Two figures on a seeded sample of rows (unit vectors):

- ``mean_cosine``: mean cosine between two different images of the sample. Near 0 for
  vectors spread over the sphere; a frozen CLIP on chest X-rays sits high (one domain);
  above :data:`COLLAPSED_COSINE` neighbours become indistinguishable (similarities all
  print as 1.0000).
- ``effective_rank``: exp of the Shannon entropy of the normalised singular values of the
  centred sample (Roy & Vetterli, 2007): how many directions the spread really uses, from 1
  to the dimension.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HEALTH_ATTR = "embedding_health"  # the store attribute (JSON) the report reads
SAMPLE_ROWS = 2000
HEALTH_SEED = 0
COLLAPSED_COSINE = 0.95


def sample_rows(candidates: np.ndarray, size: int = SAMPLE_ROWS, seed: int = HEALTH_SEED
                ) -> np.ndarray:
    """A seeded sample of ``candidates`` (ascending), all of them when there are fewer."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) <= size:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size, replace=False))


def embedding_health(unit: np.ndarray, seed: int = HEALTH_SEED) -> dict[str, Any]:
    """``{"mean_cosine", "effective_rank", "sample_size", "seed", "collapsed"}`` of unit
    vectors ``(n, D)`` (n >= 2 for a cosine, else it is None)."""
    unit = np.asarray(unit, dtype=np.float64)
    n = len(unit)
    mean_cos = None
    if n >= 2:
        total = unit.sum(axis=0)
        # sum over i != j of x_i . x_j = |sum x|^2 - sum |x_i|^2, no n x n matrix needed
        mean_cos = float((total @ total - np.einsum("ij,ij->", unit, unit)) / (n * (n - 1)))
    rank = None
    if n >= 2:
        singular = np.linalg.svd(unit - unit.mean(axis=0), compute_uv=False)
        p = singular / singular.sum() if singular.sum() > 0 else singular
        p = p[p > 0]
        rank = float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0
    collapsed = mean_cos is not None and mean_cos > COLLAPSED_COSINE
    return {"mean_cosine": mean_cos, "effective_rank": rank, "sample_size": int(n),
            "seed": int(seed), "collapsed": bool(collapsed)}


def warn_if_collapsed(health: dict[str, Any], what: str) -> None:
    """Log a warning when the vectors of ``what`` have collapsed."""
    if health.get("collapsed"):
        log.warning("%s: the vectors have collapsed (mean cosine %.3f between images, "
                    "effective rank %.1f): neighbours will look alike and similarities "
                    "will be near 1", what, health["mean_cosine"], health["effective_rank"])
