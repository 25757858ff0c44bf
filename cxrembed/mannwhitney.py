"""The weighted Mann-Whitney statistic behind every AUC and bootstrap replicate.

:func:`weighted_aucs` gives the ROC AUC of every class under many row weightings at once
(a weighting: how many times each patient is drawn in one bootstrap resample; all ones: the
point estimate). Ties count one half, as in :func:`sklearn.metrics.roc_auc_score`.

How (numpy and scipy; no Python loop over rows or weightings, one over classes for the
final sums):

1. One sort per class. Rows of equal score form a tie group; each group holding a
   positive is a *positive group* ``k`` (numbered across all classes).
2. One sparse matrix ``A`` (rows x patients) with three sections, each already in row
   order (so no sort is needed to build it):
   the positive weight of group ``k``; the negative weight entering just below group ``k``
   (a negative counts fully for every positive group above it); and, for the groups that
   tie a negative, the tied negative weight (it counts one half for its own group).
3. ``A @ weights`` (patients x W): about ``rows x classes x W`` multiply-adds, in C; the
   negative section cumulated down the groups, multiplied by the positive section and
   summed per class gives the Mann-Whitney ``U`` of every class under every weighting.
   Each class ends with one overflow row (negatives above all its positives), so the
   class totals come out of the same product.

The earlier version (argsort of every entry to merge the sections, numpy's ``reduceat``
and ``cumsum`` down the rows) spent about as long arranging as multiplying: see
benchmarks/bench_scoring.py.

Weights are whole numbers (patients drawn) and every entry of ``A`` is one, so every sum
in float32 is a whole number, exact below 2**24; the cumulated sums are checked against
that bound (float64 beyond it) and products are taken in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: whole numbers up to this are exact in float32
_FLOAT32_EXACT = 2**24
#: weightings per product: the (rows x block) float32 result stays about 16 MB
_BLOCK_ELEMENTS = 2**22
#: up to this many classes, per-class sums in a Python loop (einsum: no float64 copy of
#: the products); beyond it (a head's val selection scores hundreds), one sparse product
_LOOP_CLASSES = 32


def weighted_aucs(y: np.ndarray, s: np.ndarray, patient: np.ndarray, weights: np.ndarray,
                  known: np.ndarray | None = None) -> np.ndarray:
    """``(W, C)`` AUC of every class under every column of ``weights`` (patients x W):
    row i of class c counts ``weights[patient[i], w]`` times; NaN where a class has no
    positive or no negative weight. ``known`` (bool ``(n, C)``, optional): rows whose
    label of a class is unknown are left out of that class."""
    import scipy.sparse as sp

    y = np.asarray(y, dtype=bool)
    n, n_classes = y.shape
    w = np.ascontiguousarray(weights, dtype=np.float32)
    n_patients, n_w = w.shape
    if not n or not n_classes:
        return np.full((n_w, n_classes), np.nan)
    patient = np.asarray(patient).reshape(-1)
    ranks = _Ranks(y, s, patient, known)
    a = sp.csr_matrix((np.ones(len(ranks.indices), np.float32), ranks.indices, ranks.indptr),
                      shape=(ranks.indptr.size - 1, n_patients))
    rows = ranks.rows  # per section: each class's groups, then its overflow row
    starts = ranks.class_starts  # (C,) first row of each class in a section
    ends = np.append(starts[1:], rows) - 1  # last (overflow) row of each class
    # Float32 running sums are whole numbers, exact while every column's total negative
    # weight over all classes (at most classes x its total row weight) stays below 2**24;
    # else they are taken in float64.
    rows_per_patient = np.bincount(patient, minlength=n_patients).astype(np.float32)
    exact32 = n_classes * float((rows_per_patient @ w).max(initial=0)) < _FLOAT32_EXACT
    u, total_pos, total_neg = (np.zeros((n_classes, n_w)) for _ in range(3))
    segments = list(zip(starts, ends + 1))
    by_class = sp.csr_matrix((np.ones(rows), np.arange(rows), np.append(starts, rows)),
                             shape=(n_classes, rows))  # sums each class's rows
    by_class32 = by_class.astype(np.float32)  # whole numbers: exact
    block = int(max(16, min(n_w, _BLOCK_ELEMENTS // a.shape[0])))
    for lo in range(0, n_w, block):
        cols = slice(lo, min(lo + block, n_w))
        r = a @ w[:, cols]  # (sections, block)
        pos_w, below_w, tie_w = r[:rows], r[rows:2 * rows], r[2 * rows:]
        below_w = below_w if exact32 else below_w.astype(np.float64)
        _cumsum_rows(below_w)  # over all classes: each class takes off the ones before
        before = np.zeros((n_classes, below_w.shape[1]))
        before[1:] = below_w[starts[1:] - 1]
        total_neg[:, cols] = below_w[ends] - before
        total_pos[:, cols] = by_class32 @ pos_w
        if n_classes <= _LOOP_CLASSES:  # numpy's reduceat down the rows is several x slower
            for c, (first, stop) in enumerate(segments):
                u[c, cols] = np.einsum("kb,kb->b", pos_w[first:stop], below_w[first:stop],
                                       dtype=np.float64)
        else:
            u[:, cols] = by_class @ np.multiply(pos_w, below_w, dtype=np.float64)
        u[:, cols] -= before * total_pos[:, cols]
        if len(ranks.tie_row):  # a tied negative counts one half for its own group
            tied = np.multiply(pos_w[ranks.tie_row], tie_w, dtype=np.float64)
            u[ranks.tie_classes, cols] += 0.5 * np.add.reduceat(tied, ranks.tie_starts, axis=0)
    denom = total_pos * total_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan).T


class _Ranks:
    """The sparse matrix of :func:`weighted_aucs` from one sort per class.

    Rows are numbered per section as: class 0's positive groups, one overflow row, class
    1's positive groups, one overflow row, ... (``rows`` in all; class c starts at
    ``class_starts[c]``). Section 1, row k: the positive rows of group k. Section 2, row k:
    the negatives just below group k (tied with no positive; in the overflow row, those
    above every positive). Section 3: one row per group that ties negatives (group
    ``tie_row``), those negatives. ``indices`` / ``indptr``: the CSR of all three.
    """

    def __init__(self, y: np.ndarray, s: Any, patient: np.ndarray,
                 known: np.ndarray | None) -> None:
        n, n_classes = y.shape
        scores = np.ascontiguousarray(np.asarray(s, dtype=np.float64).T)
        order = np.argsort(scores, axis=1)  # (C, n)
        flat = (order + (np.arange(n_classes) * n)[:, None]).ravel()
        ranked = scores.ravel()[flat].reshape(n_classes, n)
        is_pos = np.ascontiguousarray(y.T).ravel()[flat]
        is_neg = ~is_pos
        if known is not None:
            counted = np.ascontiguousarray(np.asarray(known, dtype=bool).T).ravel()[flat]
            is_pos &= counted
            is_neg &= counted
        who = np.asarray(patient, dtype=np.int32)[order].ravel()
        new_group = np.empty((n_classes, n), dtype=bool)
        new_group[:, 0] = True
        np.not_equal(ranked[:, 1:], ranked[:, :-1], out=new_group[:, 1:])
        new_group = new_group.ravel()
        # Each row's mark: 1 where a positive group starts, +1 where a class starts (its
        # predecessor's overflow row). The running count is then, at every row, the
        # section row of the group entered just above it (a positive: its own + 1).
        if new_group.all():  # no ties: every row is its own group
            mark = is_pos.astype(np.int32)
            tied = None
        else:
            group = np.cumsum(new_group) - 1
            has_pos = np.zeros(int(group[-1]) + 1, dtype=bool)
            has_pos[group[is_pos]] = True
            mark = (new_group & has_pos[group]).astype(np.int32)
            tied = is_neg & has_pos[group]
        mark[n::n] += 1
        entered = np.cumsum(mark, dtype=np.int32)
        self.rows = int(entered[-1]) + 1
        self.class_starts = np.concatenate([[0], entered[n - 1:-1:n] + 1]) if n_classes > 1 \
            else np.zeros(1, dtype=np.int32)
        pos_at, neg_at = np.flatnonzero(is_pos), np.flatnonzero(is_neg)
        pos_row, neg_row = entered[pos_at] - 1, entered[neg_at]
        pos_patient, neg_patient = who[pos_at], who[neg_at]
        if tied is None:
            tie_group, tie_patient = np.zeros(0, np.int32), np.zeros(0, np.int32)
        else:
            tie_group, tie_patient = entered[tied] - 1, who[tied]
        # Section 3 holds only the groups that tie a negative, in order.
        first = np.ones(len(tie_group), dtype=bool)
        np.not_equal(tie_group[1:], tie_group[:-1], out=first[1:])
        self.tie_row = tie_group[first]
        tie_index = np.cumsum(first) - 1
        cls = np.searchsorted(self.class_starts, self.tie_row, side="right") - 1
        self.tie_classes, self.tie_starts = np.unique(cls, return_index=True)
        counts = np.concatenate([np.bincount(pos_row, minlength=self.rows),
                                 np.bincount(neg_row, minlength=self.rows),
                                 np.bincount(tie_index, minlength=len(self.tie_row))])
        self.indptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.indptr[1:])
        self.indices = np.concatenate([pos_patient, neg_patient, tie_patient])


def _cumsum_rows(x: np.ndarray, block: int = 64) -> None:
    """``np.cumsum(x, axis=0, out=x)`` as row additions within ``block``-row slabs, then
    each slab's carry: numpy's own cumsum down the rows of a C-ordered array runs one
    column at a time, several times slower. The sums here are whole numbers, exact in
    either order."""
    n_rows = x.shape[0]
    full = n_rows - n_rows % block
    if full:
        slabs = x[:full].reshape(full // block, block, *x.shape[1:])
        for i in range(1, block):
            np.add(slabs[:, i], slabs[:, i - 1], out=slabs[:, i])
        carry = np.cumsum(slabs[:, -1], axis=0)
        slabs[1:] += carry[:-1, None]
    if full < n_rows:
        if full:
            np.add(x[full], x[full - 1], out=x[full])
        np.cumsum(x[full:], axis=0, out=x[full:])
