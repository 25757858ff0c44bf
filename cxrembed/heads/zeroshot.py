"""Text zero-shot, CheXzero style, from prompt embeddings (no model needed at query time).

For each class, a positive and a negative prompt set (default ``"a chest x-ray showing
<disease>"`` vs ``"no <disease>"``). Several templates on one side are averaged the way
CheXzero does it: unit text embeddings averaged, then re-normalised. The score of class c
for image x is the softmax over the two cosine similarities,

    p_c(x) = exp(cos(x, pos_c)) / (exp(cos(x, pos_c)) + exp(cos(x, neg_c)))

on raw cosines as CheXzero's ``run_softmax_eval`` does (a temperature would not change
any AUC, and raw cosines never saturate to ties). :meth:`ZeroShotHead.logits` gives
``logit_scale * (cos_pos - cos_neg)``, the binary form of CLIP's logits, for Tip-Adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.heads.base import check_xy, cosine, register_head
from cxrembed.labels import LABELS, NO_FINDING, canonical, default_prompts

#: CLIP's learned logit scale (100 after clamping) used for text logits in Tip-Adapter.
CLIP_LOGIT_SCALE = 100.0

Prompts = dict[str, tuple[list[str], list[str]]]
TextEmbeddings = Mapping[str, tuple[np.ndarray, np.ndarray]]


def parse_prompts(obj: Any, source: str = "prompts") -> Prompts:
    """Prompts from a JSON-like object, class names in any accepted spelling.

    Accepted per class: ``{"positive": [...], "negative": [...]}``, ``[[pos...], [neg...]]``
    or ``["pos", "neg"]``. ``No Finding`` is accepted and ignored.
    """
    if not isinstance(obj, Mapping) or not obj:
        raise DataError(f"{source}: expected a JSON object {{class: prompts}}, got "
                        f"{type(obj).__name__}")
    out: Prompts = {}
    for key, value in obj.items():
        if key.strip().lower() == NO_FINDING.lower():
            continue
        name = canonical(key)
        if isinstance(value, Mapping):
            pos, neg = value.get("positive"), value.get("negative")
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            pos, neg = value
        else:
            raise DataError(f"{source}: prompts for {key!r} must be {{'positive': [...], "
                            "'negative': [...]}} or [positive, negative]")
        pos = [pos] if isinstance(pos, str) else list(pos or [])
        neg = [neg] if isinstance(neg, str) else list(neg or [])
        if not pos or not neg or not all(isinstance(p, str) and p.strip() for p in pos + neg):
            raise DataError(f"{source}: class {key!r} needs at least one non-empty positive "
                            "and one non-empty negative prompt")
        out[name] = (pos, neg)
    return out


def load_prompts(path: str | os.PathLike) -> Prompts:
    """Read a prompts JSON file (see :func:`parse_prompts` for the layout)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"prompts file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"prompts file {path} is not valid JSON: {exc}") from None
    return parse_prompts(obj, source=str(path))


def merge_prompts(base: Prompts | None, override: Prompts | None) -> Prompts:
    """The 14 classes' prompts: ``override`` where given, else ``base``, else defaults."""
    merged = dict(default_prompts())
    merged.update(base or {})
    merged.update(override or {})
    return {name: merged[name] for name in LABELS}


def class_text_vectors(text: TextEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``(14, D)`` positive and negative class vectors from per-class prompt embeddings.

    Each side's template embeddings are normalised, averaged, and normalised again.
    """
    missing = [name for name in LABELS if name not in text]
    if missing:
        raise DataError(f"no prompt embeddings for {', '.join(missing)}")

    def side(vectors: np.ndarray, name: str) -> np.ndarray:
        v = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if not len(v):
            raise DataError(f"class {name!r} has an empty prompt set")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        mean = v.mean(axis=0)
        return mean / max(np.linalg.norm(mean), 1e-12)

    pos = np.stack([side(text[name][0], name) for name in LABELS])
    neg = np.stack([side(text[name][1], name) for name in LABELS])
    return pos, neg


@register_head("zeroshot")
class ZeroShotHead:
    """Training-free: CheXzero's softmax over [positive, negative] prompt similarities."""

    input = "normalized"
    needs_text = True

    def __init__(self, text: TextEmbeddings | None = None, seed: int = 0,
                 logit_scale: float = CLIP_LOGIT_SCALE) -> None:
        if text is None:
            raise ConfigError("the zeroshot head needs prompt embeddings (text=...); the "
                              "store must have a text tower")
        self.pos, self.neg = class_text_vectors(text)
        self.logit_scale = float(logit_scale)
        self.selected: dict[str, Any] = {}

    def fit(self, X: Any = None, Y: Any = None, X_val: Any = None, Y_val: Any = None
            ) -> "ZeroShotHead":
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
