"""Batches of images for training and evaluation, and per-class AUC on val / test."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed.adapt.config import AdaptConfig
from cxrembed.labels import LABELS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def auc_report(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float, list[str]]:
    """Per-class AUC (NaN where undefined), their mean over defined classes, the undefined."""
    from cxrembed.metrics import mean_auc, per_class_auc

    aucs = per_class_auc(labels, scores, names=LABELS, warn=False)
    undefined = [LABELS[i] for i in np.flatnonzero(np.isnan(aucs))]
    return aucs, mean_auc(aucs, warn=False), undefined


def auc_dict(aucs: np.ndarray) -> dict[str, float | None]:
    """``{class: AUC}`` rounded for JSON, None where undefined."""
    return {name: (None if math.isnan(a) else round(float(a), 6)) for name, a in zip(LABELS, aucs)}


def undefined_classes(labels: np.ndarray) -> list[str]:
    """Classes with no positives or no negatives among ``labels`` rows (AUC undefined)."""
    pos = labels.sum(axis=0)
    return [LABELS[i] for i in np.flatnonzero((pos == 0) | (pos == len(labels)))]


class RowBatches:
    """Batch ``i`` = (uint8 images, float labels) of a fixed list of row batches (a
    map-style dataset for ``DataLoader(batch_size=None)``)."""

    def __init__(self, source: Any, labels: np.ndarray, batches: list[np.ndarray]) -> None:
        self.source, self.labels, self.batches = source, labels, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        rows = self.batches[i]
        return (torch.from_numpy(self.source.read(rows)),
                torch.from_numpy(self.labels[rows].astype(np.float32)))


def batch_loader(source: Any, labels: np.ndarray, batches: list[np.ndarray], workers: int,
                 cuda: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over fixed row batches (the order is decided by the caller)."""
    import torch

    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda, "batch_size": None}
    if workers:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(RowBatches(source, labels, batches), **kwargs)


def prepare_input(x: torch.Tensor, config: AdaptConfig, device: torch.device) -> torch.Tensor:
    """Channels-last on CUDA when asked (no effect on the CPU)."""
    import torch

    if device.type == "cuda" and config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(config: AdaptConfig, device: torch.device):
    """bf16 autocast on CUDA when ``config.amp``; a no-op elsewhere."""
    import torch

    if device.type == "cuda" and config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate_split(model: torch.nn.Module, source: Any, labels: np.ndarray, rows: np.ndarray,
                   split: str, config: AdaptConfig, device: torch.device,
                   progress: bool = False) -> np.ndarray:
    """Head logits (float32, rows × 14) of ``rows``; ``split`` names the bar and the log."""
    import torch

    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.progress import progress_bar

    batches = [rows[i:i + config.eval_batch_size]
               for i in range(0, len(rows), config.eval_batch_size)]
    out = []
    model.eval()
    loader = batch_loader(source, labels, batches, config.loader_workers, device.type == "cuda")
    with torch.inference_mode(), progress_bar(len(rows), f"{split}", enabled=progress) as advance:
        for images, _ in loader:
            x = prepare_input(to_clip_tensor(images, device=device), config, device)
            with autocast(config, device):
                out.append(model(x).float().cpu())
            advance(len(images))
    log.debug("evaluated %d %s images", len(rows), split)
    return torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)), np.float32)
