"""Text zero-shot, CheXzero style, from prompt embeddings (no model needed at query time).

For each class, a positive and a negative prompt set (default ``"a chest x-ray showing
<disease>"`` vs ``"no <disease>"``). Several templates on one side are averaged the way
CheXzero does it: unit text embeddings averaged, then re-normalised. The score of class c
for image x is the softmax over the two cosine similarities,

    p_c(x) = exp(cos(x, pos_c)) / (exp(cos(x, pos_c)) + exp(cos(x, neg_c)))

on raw cosines as CheXzero's ``run_softmax_eval`` does (a temperature would not change
any AUC, and raw cosines never saturate to ties). Prompt files are read by
:mod:`cxrembed.prompts`. :meth:`ZeroShotHead.logits` gives
``logit_scale * (cos_pos - cos_neg)``, the binary form of CLIP's logits, for Tip-Adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.heads.base import check_xy, cosine, register_head
from cxrembed.labels import NO_FINDING

#: CLIP's learned logit scale (100 after clamping) used for text logits in Tip-Adapter.
CLIP_LOGIT_SCALE = 100.0

TextEmbeddings = Mapping[str, tuple[np.ndarray, np.ndarray]]


def class_text_vectors(text: TextEmbeddings, label_names: Any = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``(C, D)`` positive and negative class vectors from per-class prompt embeddings,
    in ``label_names`` order (default: the order of ``text``, No Finding left out).

    Each side's template embeddings are normalised, averaged, and normalised again.
    """
    names = (list(label_names) if label_names is not None
             else [n for n in text if n.lower() != NO_FINDING.lower()])
    missing = [name for name in names if name not in text]
    if missing:
        raise DataError(f"no prompt embeddings for {', '.join(missing)}")

    def side(vectors: np.ndarray, name: str) -> np.ndarray:
        v = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if not len(v):
            raise DataError(f"class {name!r} has an empty prompt set")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        mean = v.mean(axis=0)
        return mean / max(np.linalg.norm(mean), 1e-12)

    pos = np.stack([side(text[name][0], name) for name in names])
    neg = np.stack([side(text[name][1], name) for name in names])
    return pos, neg


@register_head("zeroshot")
class ZeroShotHead:
    """Training-free: CheXzero's softmax over [positive, negative] prompt similarities."""

    input = "normalized"
    needs_text = True

    def __init__(self, text: TextEmbeddings | None = None, seed: int = 0,
                 logit_scale: float = CLIP_LOGIT_SCALE, label_names: Any = None) -> None:
        if text is None:
            raise ConfigError("the zeroshot head needs prompt embeddings (text=...); the "
                              "store must have a text tower")
        self.pos, self.neg = class_text_vectors(text, label_names)
        self.logit_scale = float(logit_scale)
        self.selected: dict[str, Any] = {}

    def fit(self, X: Any = None, Y: Any = None, X_val: Any = None, Y_val: Any = None,
            known: Any = None) -> "ZeroShotHead":
        """Nothing to fit (kept so every head is driven alike)."""
        return self

    def _cosines(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        X, _ = check_xy(X)
        if X.shape[1] != self.pos.shape[1]:
            raise DataError(f"image vectors have {X.shape[1]} dims, prompt embeddings "
                            f"{self.pos.shape[1]}: they come from different encoders")
        both = cosine(X, np.vstack([self.pos, self.neg])).astype(np.float64)
        return both[:, :len(self.pos)], both[:, len(self.pos):]

    def predict(self, X: Any) -> np.ndarray:
        """``(n, 14)`` softmax probability of the positive prompt."""
        cos_pos, cos_neg = self._cosines(X)
        return 1.0 / (1.0 + np.exp(cos_neg - cos_pos))

    def logits(self, X: Any) -> np.ndarray:
        """``(n, 14)`` binary CLIP logits ``logit_scale * (cos_pos - cos_neg)``."""
        cos_pos, cos_neg = self._cosines(X)
        return self.logit_scale * (cos_pos - cos_neg)
