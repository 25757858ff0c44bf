"""Batches of images for training and evaluation, and per-class AUC on val / test."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed.adapt.config import AdaptConfig
from cxrembed.labels import LABELS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def auc_report(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None,
               names: Sequence[str] = LABELS) -> tuple[np.ndarray, float, list[str]]:
    """Per-class AUC on the known labels of each class (NaN where undefined: no positive or
    no negative among them), their mean over the defined classes, the undefined ones.

    Unknown labels (``known`` False) are left out of their class, never counted as
    negatives; this is how val selects the best epoch and how test is scored.
    """
    from cxrembed.metrics import mean_auc, per_class_auc

    aucs = per_class_auc(labels, scores, names=names, warn=False, known=known)
    undefined = [names[i] for i in np.flatnonzero(np.isnan(aucs))]
    return aucs, mean_auc(aucs, warn=False), undefined


def auc_dict(aucs: np.ndarray, names: Sequence[str] = LABELS) -> dict[str, float | None]:
    """``{class: AUC}`` rounded for JSON, None where undefined."""
    return {name: (None if math.isnan(a) else round(float(a), 6)) for name, a in zip(names, aucs)}


def undefined_classes(labels: np.ndarray, known: np.ndarray | None = None,
                      names: Sequence[str] = LABELS) -> list[str]:
    """Classes with no positives or no negatives among the known labels of ``labels`` rows
    (their AUC is undefined)."""
    known = np.ones(labels.shape, bool) if known is None else np.asarray(known, dtype=bool)
    pos = (np.asarray(labels, dtype=bool) & known).sum(axis=0)
    return [names[i] for i in np.flatnonzero((pos == 0) | (pos == known.sum(axis=0)))]


class RowBatches:
    """Batch ``i`` = (uint8 images, float labels, bool known) of a fixed list of row
    batches (a map-style dataset for ``DataLoader(batch_size=None)``); ``known`` None:
    every label known."""

    def __init__(self, source: Any, labels: np.ndarray, batches: list[np.ndarray],
                 known: np.ndarray | None = None) -> None:
        self.source, self.labels, self.batches = source, labels, batches
        self.known = np.ones(labels.shape, bool) if known is None else known

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        rows = self.batches[i]
        return (torch.from_numpy(self.source.read(rows)),
                torch.from_numpy(self.labels[rows].astype(np.float32)),
                torch.from_numpy(np.ascontiguousarray(self.known[rows], dtype=bool)))


def batch_loader(source: Any, labels: np.ndarray, batches: list[np.ndarray], workers: int,
                 cuda: bool, known: np.ndarray | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over fixed row batches (the order is decided by the caller)."""
    import torch

    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda, "batch_size": None}
    if workers:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(RowBatches(source, labels, batches, known), **kwargs)


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
    """Head logits (float32, rows × classes) of ``rows``; ``split`` names the bar and the
    log.

    Under torchrun every rank calls this with the same ``rows``: each evaluates its
    contiguous share and every rank gets all the logits back, in ``rows`` order.
    """
    from cxrembed.distributed import active, gather_rows, rank_share

    here = active()
    if not here.distributed:
        return _evaluate_rows(model, source, labels, rows, split, config, device, progress)
    # Cut at whole eval batches: each rank runs exactly the batches one process would run,
    # so every logit is computed as in one process (batch size changes float rounding).
    start, stop = rank_share(len(rows), here.world_size, here.rank, config.eval_batch_size)
    mine = _evaluate_rows(model, source, labels, rows[start:stop], split, config, device,
                          progress and here.main)
    positions, scores = gather_rows(np.arange(start, stop), mine)
    out = np.empty((len(rows), scores.shape[1]), np.float32)
    out[positions] = scores
    return out


def _evaluate_rows(model: torch.nn.Module, source: Any, labels: np.ndarray, rows: np.ndarray,
                   split: str, config: AdaptConfig, device: torch.device,
                   progress: bool) -> np.ndarray:
    import torch

    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.progress import progress_bar

    batches = [rows[i:i + config.eval_batch_size]
               for i in range(0, len(rows), config.eval_batch_size)]
    out = []
    model.eval()
    loader = batch_loader(source, labels, batches, config.loader_workers, device.type == "cuda")
    with torch.inference_mode(), progress_bar(len(rows), f"{split}", enabled=progress) as advance:
        for images, *_ in loader:
            x = prepare_input(to_clip_tensor(images, device=device), config, device)
            with autocast(config, device):
                out.append(model(x).float().cpu())
            advance(len(images))
    log.debug("evaluated %d %s images", len(rows), split)
    return torch.cat(out).numpy() if out else np.zeros((0, labels.shape[1]), np.float32)
