"""Tip-Adapter (Zhang et al., 2022), training-free, in its binary-per-class form.

Tip-Adapter adds to CLIP's zero-shot logits a cache model built from the shots: keys are
the shots' unit vectors, values their labels, and a query's affinity to key j is
``exp(-beta * (1 - cos(x, key_j)))``. For one class seen as the binary task {positive,
negative}, the one-hot values become a +1 / -1 vote, so the class logit is

    zero_shot_logit_c(x) + alpha * sum_j affinity_j(x) * (2 * y_jc - 1)

with ``zero_shot_logit_c = 100 * (cos(x, pos_c) - cos(x, neg_c))`` (see zeroshot.py).
``alpha`` (0 included: plain zero-shot) and ``beta`` are chosen on the few-shot val
sample by mean AUC; without one, Tip-Adapter's own defaults (1, 1) are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError
from cxrembed.heads.base import (build_config, check_known, check_xy, cosine, has_val,
                                 register_head, single_thread, unit_rows, val_mean_aucs)
from cxrembed.heads.zeroshot import CLIP_LOGIT_SCALE, TextEmbeddings, ZeroShotHead


@dataclass
class TipConfig:
    alphas: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    betas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    default_alpha: float = 1.0  # used when there is no val sample (Tip-Adapter's init)
    default_beta: float = 1.0
    logit_scale: float = CLIP_LOGIT_SCALE



@register_head("tip")
class TipAdapterHead:
    """Zero-shot text logits plus a cache model of the shots; alpha, beta chosen on val."""

    input = "normalized"
    needs_text = True
    shares_similarity = True  # predict takes the sweep's query-shot cosines

    def __init__(self, text: TextEmbeddings | None = None, seed: int = 0, **options: Any
                 ) -> None:
        self.config = build_config(TipConfig, options, "tip")
        if not self.config.alphas or not self.config.betas:
            raise ConfigError("tip needs at least one alpha and one beta")
        if text is None:
            raise ConfigError("the tip head needs prompt embeddings (text=...); the store "
                              "must have a text tower")
        self.zeroshot = ZeroShotHead(text, logit_scale=self.config.logit_scale)
        self.selected: dict[str, Any] = {}
        self._keys: np.ndarray | None = None
        self._values: np.ndarray | None = None

    def _cache(self, X: np.ndarray, beta: float, similarity: np.ndarray | None = None
               ) -> np.ndarray:
        affinity = (cosine(X, self._keys) if similarity is None  # float32 (n, shots)
                    else similarity.astype(np.float32, copy=True))
        affinity -= 1.0
        affinity *= beta
        np.exp(affinity, out=affinity)
        return (affinity @ self._values).astype(np.float64)

    def fit(self, X: Any, Y: Any, X_val: Any = None, Y_val: Any = None, known: Any = None
            ) -> "TipAdapterHead":
        """Build the cache from the shots; pick alpha and beta on the val pair. An unknown
        label (``known`` False) has value 0 in the cache: neither for nor against."""
        X, Y = check_xy(X, Y)
        self._keys = unit_rows(X)
        self._values = 2.0 * Y.astype(np.float32) - 1.0
        mask = check_known(known, Y)
        if mask is not None:
            self._values *= mask
        alpha, beta, by, best = self.config.default_alpha, self.config.default_beta, "default", None
        if has_val(X_val, Y_val):
            X_val, Y_val = check_xy(X_val, Y_val, "X_val")
            with single_thread():  # small products: one BLAS thread is faster
                text = self.zeroshot.logits(X_val)
                grid = [(a, b) for b in self.config.betas for a in self.config.alphas]
                caches = {b: self._cache(X_val, b) for b in self.config.betas}
                aucs = val_mean_aucs(Y_val, [text + a * caches[b] for a, b in grid])
            for (a, b), auc in zip(grid, aucs):
                if not np.isnan(auc) and (best is None or auc > best):  # first wins
                    alpha, beta, best, by = a, b, float(auc), "val"
        self.selected = {"alpha": alpha, "beta": beta, "by": by,
                         "val_mean_auc": None if best is None else float(best)}
        return self

    def predict(self, X: Any, similarity: np.ndarray | None = None,
                text_logits: np.ndarray | None = None) -> np.ndarray:
        """``(n, 14)`` combined logits. The sweep passes what every seed shares:
        ``similarity``, the queries' cosines to the shots ``(n, shots)`` in fit order, and
        ``text_logits``, :meth:`ZeroShotHead.logits` of ``X``."""
        if self._keys is None:
            raise ConfigError("tip head: call fit before predict")
        if similarity is not None and similarity.shape[1] != len(self._keys):
            raise ConfigError(f"tip head: similarities to {similarity.shape[1]} shots given, "
                              f"fitted on {len(self._keys)}")
        if similarity is None or text_logits is None:  # X is used: check it
            X, _ = check_xy(X)
        text = self.zeroshot.logits(X) if text_logits is None else text_logits
        return text + self.selected["alpha"] * self._cache(X, self.selected["beta"],
                                                            similarity)
