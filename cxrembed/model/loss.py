"""Focal binary cross-entropy for multi-label logits (Lin et al. 2017), the paper's loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def focal_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25,
                          gamma: float = 2.0, pos_weight: torch.Tensor | None = None,
                          known: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the known (sample, class) cells of ``alpha_t (1 - p_t)^gamma BCE``.

    ``alpha`` weighs positives (``1 - alpha`` negatives); ``pos_weight`` (per class, from
    the train split) further multiplies the positive terms. ``known`` (bool, like
    ``targets``; default: all known) leaves unknown labels out: they add nothing to the
    loss and get no gradient, and the mean is over the known cells only (0 when none is).
    Computed in float32.
    """
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * (1 - p_t).pow(gamma) * bce
    if pos_weight is not None:
        loss = loss * (1 + (pos_weight.to(loss) - 1) * targets)
    if known is None:
        return loss.mean()
    known = known.to(device=loss.device, dtype=torch.bool)
    # where(), not a product: an unknown cell contributes exactly 0 and no gradient
    masked = torch.where(known, loss, torch.zeros_like(loss))
    return masked.sum() / known.sum().clamp(min=1)


def train_pos_weight(labels: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Per-class negatives/positives on the rows given (the train split only), counting
    only known labels; 1 where a class has no known positives (nothing to up-weight)."""
    labels = np.asarray(labels, dtype=np.float64)
    known = np.ones(labels.shape, bool) if known is None else np.asarray(known, dtype=bool)
    pos = (labels * known).sum(axis=0)
    neg = known.sum(axis=0) - pos
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0).astype(np.float32)
