"""Centring for similarity search: subtract the store's mean vector, then re-normalise.

CLIP image embeddings of one domain are anisotropic: every chest X-ray points the same
way (mean cosine between two images 0.93-0.997 on the demo's stores), so every neighbour
reads ``sim 0.9999``. Centring is the known remedy: a stored or query unit vector ``u``
becomes ``(u - m) / |u - m|``, where ``m`` is the mean of the unit vectors of *every row
of the store* (every image it holds; images skipped by ``--skip-bad`` are not rows). The
same ``m`` transforms the index's vectors and every query (stored id, text, new image),
so the similarity is still a cosine, between centred vectors.

Whether a store's searches centre (``--centre auto``) is decided by one figure measured
on the store itself when it is encoded, and recorded in its attributes:

``finding-status precision@10``: for a seeded sample of up to 2,000 labelled rows, each a
query against every row of another patient (exact search; in a store of more than
1,000,000 rows, against the rows of a seeded sample of 2,048-row spans of it, about
1,000,000 rows, so that the figure reads and compares about as many rows whatever the
store's size), the share of its 10
neighbours that match its finding status: a neighbour sharing at least one of its
positive labels for a query with findings, a neighbour with no finding for a No Finding
query. It is label precision@10 with "No Finding" counted as a label. It decides, rather
than the share of neighbours with a shared positive label over queries with findings
only, because a search is asked about normal images too (54% of NIH's) and a transform
can raise the findings-only figure by pulling normal images apart (centring the demo's
frozen store does: +0.08 on findings queries, -0.02 over all queries). Rule: centre
unless the centred figure is worse than the raw one by more than two paired standard
errors of the difference over the sampled queries (recorded beside it). At equal
retrieval, within what the sample can tell apart, the centred similarities are the ones
that tell neighbours apart: on the demo's adapted store raw top-5 cosines all read
0.9998 while centred ones spread over the third decimal, and the figure differed by
-0.0015 with a standard error of 0.0027 (a tie) in one run and +0.0072 (0.0024) in another.

Stores written before this record (attributes ``embedding_mean`` and ``search_centring``)
still search: ``auto`` leaves them uncentred, and ``on`` computes their mean at open,
reading the vectors in blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)

MEAN_ATTR = "embedding_mean"  # float32 (D,) attribute: mean unit vector of every row
RECORD_ATTR = "search_centring"  # JSON attribute: the measured figure and the choice
CENTRE_CHOICES = ("auto", "on", "off")
FIGURE = "finding-status precision@10"
RULE = "centre unless centred < raw by more than 2 paired standard errors"
TIE_STDERRS = 2.0
K = 10
QUERY_SAMPLE = 2000
SEED = 0
BLOCK = 16_384  # rows read per step
SCORE_BLOCK = 2_048  # rows read and compared with the queries per step (bounds the memory)
NEIGHBOUR_POOL = 1_000_000  # rows past which the neighbours come from a sample of blocks

#: read(start, stop) -> float32 unit vectors of rows start..stop-1
BlockReader = Callable[[int, int], np.ndarray]


def centre(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(x - mean) / |x - mean|`` row by row (float32)."""
    y = np.asarray(x, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    y /= np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    return y


def mean_unit_vector(read: BlockReader, n: int, kept: np.ndarray | None = None) -> np.ndarray:
    """float32 mean of the unit vectors of rows ``0..n-1`` (only ``kept`` ones when a mask
    is given), read ``BLOCK`` rows at a time."""
    total, count = None, 0
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        x = read(start, stop)
        if kept is not None:
            x = x[kept[start:stop]]
        part = x.sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
        count += len(x)
    if not count:
        raise ConfigError("no rows to take a mean of")
    return (total / count).astype(np.float32)


# ---------------------------------------------------------------------------------------
# The figure


def _merge_top(best: tuple[np.ndarray, np.ndarray], sims: np.ndarray, rows: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    rows = np.broadcast_to(rows, sims.shape)
    sims = np.concatenate([best[0], sims], axis=1)
    rows = np.concatenate([best[1], rows], axis=1)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return np.take_along_axis(sims, top, axis=1), np.take_along_axis(rows, top, axis=1)


def finding_status(labels: np.ndarray, known: np.ndarray, queries: np.ndarray,
                   neighbours: np.ndarray) -> np.ndarray:
    """Per query, the share of its neighbours ``(q, k)`` matching its finding status."""
    y = labels.astype(bool) & known.astype(bool)
    yq, yn = y[queries], y[neighbours]  # (q, L), (q, k, L)
    shares = (yq[:, None, :] & yn).any(axis=2)
    normal = ~yn.any(axis=2)
    match = np.where(yq.any(axis=1)[:, None], shares, normal)
    return match.mean(axis=1)


def neighbour_pool(kept: np.ndarray, seed: int) -> np.ndarray:
    """Rows (ascending) the figure's exact search looks among: every kept row or, when there
    are more than ``NEIGHBOUR_POOL``, the kept rows of a seeded sample of whole
    ``SCORE_BLOCK``-row spans of the store (about ``NEIGHBOUR_POOL`` rows), so that the
    figure reads those spans only: its time and memory stop growing with the store."""
    rows = np.flatnonzero(kept)
    if len(rows) <= NEIGHBOUR_POOL:
        return rows
    spans = -(-len(kept) // SCORE_BLOCK)
    chosen = np.zeros(spans, bool)
    chosen[np.random.default_rng(seed).choice(spans, min(spans, -(-NEIGHBOUR_POOL //
                                                                   SCORE_BLOCK)),
                                              replace=False)] = True
    return rows[chosen[rows // SCORE_BLOCK]]


def _exact_top(read: BlockReader, pool: np.ndarray, patients: np.ndarray, queries: np.ndarray,
               q_raw: np.ndarray, mean: np.ndarray, k: int
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact top-``k`` (similarities, rows) of each query among the ``pool`` rows (ascending)
    of other patients, raw and centred, one ``SCORE_BLOCK``-row span of the store at a
    time (only the spans that hold pool rows are read)."""
    q_cen = centre(q_raw, mean)
    empty = (np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), int))
    best = {"raw": empty, "centred": empty}
    for rows in np.split(pool, np.flatnonzero(np.diff(pool // SCORE_BLOCK)) + 1):
        if not len(rows):
            continue
        block = read(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]
        banned = patients[queries][:, None] == patients[None, rows]
        for name, q, x in (("raw", q_raw, block), ("centred", q_cen, centre(block, mean))):
            sims = q @ x.T
            sims[banned] = -np.inf
            best[name] = _merge_top(best[name], sims, rows, k)
    return best


def measure_centring(read: BlockReader, n: int, labels: np.ndarray, known: np.ndarray,
                     patients: np.ndarray, mean: np.ndarray, *, kept: np.ndarray | None = None,
                     sample: int = QUERY_SAMPLE, seed: int = SEED, k: int = K) -> dict[str, Any]:
    """The ``search_centring`` record: the figure raw and centred, and the choice.

    Queries: a seeded sample of rows whose finding status is known (a known positive, or
    every label known); neighbours: exact top-``k`` among rows of other patients (among
    :func:`neighbour_pool`'s sample of blocks when the store has over ``NEIGHBOUR_POOL``).
    """
    from cxrembed.store.health import sample_rows

    began = time.perf_counter()
    kept = np.ones(n, bool) if kept is None else np.asarray(kept, bool)
    y = labels.astype(bool) & known.astype(bool)
    eligible = (y.any(axis=1) | known.astype(bool).all(axis=1)) & kept
    queries = sample_rows(np.flatnonzero(eligible), sample, seed)
    record: dict[str, Any] = {"figure": FIGURE, "k": k, "queries": int(len(queries)),
                              "sample_seed": seed, "mean_rows": int(kept.sum()),
                              "rule": RULE}
    if len(queries) < 2 or kept.sum() <= k:
        return {**record, "raw": None, "centred": None, "difference": None, "stderr": None,
                "centre": False, "why": "too few labelled rows to measure: not centred"}
    q_raw = np.concatenate([read(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]  # spans
                            for rows in np.split(queries, np.flatnonzero(  # <= SCORE_BLOCK
                                np.diff(queries // SCORE_BLOCK)) + 1)]).astype(np.float32)
    pool = neighbour_pool(kept, seed + 1)
    record["pool_rows"] = int(len(pool))
    best = _exact_top(read, pool, patients, queries, q_raw, mean, k)
    figures = {}
    for name, (sims, rows) in best.items():
        rows = np.where(np.isfinite(sims), rows, -1)
        ok = (rows >= 0).all(axis=1)
        figures[name] = finding_status(labels, known, queries[ok], rows[ok])
    raw, cen = figures["raw"], figures["centred"]
    diff = cen - raw
    stderr = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    chosen = bool(diff.mean() >= -TIE_STDERRS * (stderr or 0.0))
    log.info("search centring: %s raw %.4f, centred %.4f (%d queries, %.1f s): %s", FIGURE,
             raw.mean(), cen.mean(), len(raw), time.perf_counter() - began,
             "centred" if chosen else "not centred")
    return {**record, "queries": int(len(raw)), "raw": round(float(raw.mean()), 4),
            "centred": round(float(cen.mean()), 4), "difference": round(float(diff.mean()), 4),
            "stderr": None if stderr is None else round(stderr, 4), "centre": chosen,
            "why": _why(float(cen.mean()), float(raw.mean()), stderr, chosen, len(raw),
                        float(diff.mean()))}


def _why(centred: float, raw: float, stderr: float | None, chosen: bool, queries: int,
         difference: float | None = None) -> str:
    """The choice in words, with the figures that made it."""
    difference = centred - raw if difference is None else difference
    se = f", standard error {stderr:.4f}" if stderr is not None else ""
    if not chosen:
        verdict = f"centred is worse by more than {TIE_STDERRS:g} standard errors: not centred"
    elif centred >= raw:
        verdict = "centred"
    else:
        verdict = f"a tie within {TIE_STDERRS:g} standard errors: centred"
    return (f"{FIGURE} centred {centred:.4f}, raw {raw:.4f} (difference {difference:+.4f}"
            f"{se}, {queries:,} queries): {verdict}")


def store_centring_attrs(read: BlockReader, n: int, labels: np.ndarray, known: np.ndarray,
                         patients: np.ndarray, kept: np.ndarray | None = None
                         ) -> dict[str, Any]:
    """``{MEAN_ATTR: mean, RECORD_ATTR: record}``: what an encode records for search."""
    mean = mean_unit_vector(read, n, kept)
    return {MEAN_ATTR: mean,
            RECORD_ATTR: measure_centring(read, n, labels, known, patients, mean, kept=kept)}


# ---------------------------------------------------------------------------------------
# Applying it


@dataclass
class Centring:
    """Whether a search centres, with what mean, and why."""

    centred: bool
    mean: np.ndarray | None  # float32 (D,) when centred
    choice: str  # what was asked: auto | on | off
    reason: str  # why the vectors are (not) centred, in words
    record: dict | None = None  # the store's measured figure, when it has one

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Unit vectors ``(n, D)`` as searched: centred and re-normalised, or as given."""
        x = np.asarray(x, dtype=np.float32)
        return centre(x, self.mean) if self.centred else x

    def to_dict(self) -> dict[str, Any]:
        return {"centred": self.centred, "choice": self.choice, "reason": self.reason,
                "figure": self.record}


def store_mean(store: Any) -> np.ndarray:
    """The store's recorded mean unit vector, or (older stores) one computed now in blocks."""
    mean = store.attrs.get(MEAN_ATTR)
    if mean is not None:
        return np.asarray(mean, dtype=np.float32)
    began = time.perf_counter()
    mean = mean_unit_vector(lambda a, b: store.embeddings(np.arange(a, b)), len(store))
    log.info("store %s records no mean vector (encoded before search centring): computed "
             "over its %d rows in %.1f s", store.path, len(store), time.perf_counter() - began)
    return mean


def resolve_centring(store: Any, choice: str = "auto") -> Centring:
    """The :class:`Centring` of searches of ``store`` for ``choice`` (auto | on | off)."""
    if isinstance(choice, Centring):
        return choice
    if choice not in CENTRE_CHOICES:
        raise ConfigError(f"--centre {choice!r}: expected one of {', '.join(CENTRE_CHOICES)}")
    record = store.attrs.get(RECORD_ATTR)
    record = record if isinstance(record, dict) else None
    if choice == "off":
        return Centring(False, None, choice, "--centre off", record)
    if choice == "on":
        return Centring(True, store_mean(store), choice, "--centre on", record)
    if record is None:
        return Centring(False, None, choice, "the store records no centring figure (encoded "
                        "before cxrembed measured one): not centred; --centre on centres it",
                        None)
    centred = bool(record.get("centre"))
    why = record.get("why") or f"{FIGURE}: {'centred' if centred else 'not centred'}"
    return Centring(centred, store_mean(store) if centred else None, choice, why, record)
