"""What a run trains: CLIP + the diagnosis head, the optimiser, the scheduler, the loss.

:func:`build_training` is the one place the model is created and wrapped (``compile``;
a distributed wrapper belongs in :func:`wrap_for_training` too), so the loop sees one
:class:`Training` whatever the device or the number of processes.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed.adapt.config import AdaptConfig
from cxrembed.distributed import Launch
from cxrembed.labels import NUM_CLASSES

if TYPE_CHECKING:
    import torch

    from cxrembed.adapt.draws import BatchDraws
    from cxrembed.model import AdaptedCLIP

log = logging.getLogger(__name__)


@dataclass
class Training:
    """The model and what steps it. ``forward`` is what training batches go through (the
    model itself, or a compiled / distributed wrapper of it); ``model`` is the bare
    :class:`~cxrembed.model.AdaptedCLIP` whose weights are saved and restored."""

    model: AdaptedCLIP
    forward: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pos_weight: torch.Tensor | None
    trainable_params: int
    #: dropout masks drawn per global batch (see :mod:`cxrembed.adapt.draws`)
    draws: BatchDraws | None = None
    #: this process's place in a torchrun job (rank 0 of 1 without torchrun)
    launch: Launch = Launch()

    @property
    def infer(self) -> Any:
        """What evaluation batches go through: never the distributed wrapper (each rank
        evaluates its own share of val / test, with no collective per batch)."""
        return self.model if self.launch.distributed else self.forward

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_model(clip: torch.nn.Module, config: AdaptConfig, num_classes: int = NUM_CLASSES
                ) -> AdaptedCLIP:
    """CLIP with its top ``config.unfreeze`` blocks trainable and a fresh head of
    ``num_classes`` outputs (the dataset's label set) whose init depends on
    ``config.seed`` only."""
    import torch

    from cxrembed.model import AdaptedCLIP, DiagnosisHead

    torch.manual_seed(config.seed)
    proj = clip.visual.proj
    head = DiagnosisHead(dropout=(config.head_dropout1, config.head_dropout2),
                         in_dim=int(proj.shape[1]) if proj is not None else 512,
                         num_classes=num_classes)
    return AdaptedCLIP(clip, head, config.unfreeze)


def wrap_for_training(model: AdaptedCLIP, config: AdaptConfig, device: torch.device,
                      launch: Launch = Launch()) -> Any:
    """Move ``model`` to ``device`` and return what the loop calls: the model, wrapped in
    DistributedDataParallel under torchrun (gradients averaged over the ranks), compiled
    if asked."""
    import torch

    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    forward: Any = model
    if launch.distributed:
        from torch.nn.parallel import DistributedDataParallel

        _sync_batch_norm(model, device)
        # No buffer sync in forward: the model's buffers never change, and it would put a
        # collective in every forward. The option was renamed in torch 2.14.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    return torch.compile(forward) if config.compile else forward


def _sync_batch_norm(model: AdaptedCLIP, device: torch.device) -> None:
    """BatchNorm statistics per rank would differ from one process's: synchronise them on
    CUDA (SyncBatchNorm needs it); CLIP's ViTs and the head have none (LayerNorm only)."""
    import torch

    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if not any(isinstance(m, norms) for m in model.modules()):
        return
    if device.type != "cuda":
        log.warning("the model has BatchNorm layers: on the CPU each process keeps its own "
                    "batch statistics, so the run differs from a one-process run")
        return
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the layers in place


def build_training(clip: torch.nn.Module, config: AdaptConfig, device: torch.device,
                   train_labels: np.ndarray, train_known: np.ndarray | None = None,
                   launch: Launch = Launch()) -> Training:
    """Model (one head output per column of ``train_labels``), AdamW (encoder and head
    groups), ReduceLROnPlateau on val AUC, the loss's positive weights (from the train
    split's known labels only, when ``config.class_weights``)."""
    import torch

    from cxrembed.adapt import draws
    from cxrembed.model import count_trainable

    model = build_model(clip, config, int(train_labels.shape[1]))
    trainable = count_trainable(model)
    log.info("%s, unfreeze %d: %s trainable parameters", config.model, config.unfreeze,
             f"{trainable:,}")
    batch_draws = draws.install(model)
    forward = wrap_for_training(model, config, device, launch)
    optimizer = torch.optim.AdamW(
        [{"params": model.encoder_parameters(), "lr": config.lr_encoder, "name": "encoder"},
         {"params": model.head_parameters(), "lr": config.lr_head, "name": "head"}],
        weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience)
    pos_weight = None
    if config.class_weights:
        from cxrembed.model.loss import train_pos_weight

        pos_weight = torch.from_numpy(train_pos_weight(train_labels, train_known)).to(device)
    return Training(model, forward, optimizer, scheduler, pos_weight, trainable, batch_draws,
                    launch)
