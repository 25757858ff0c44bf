"""What a run trains: CLIP + the diagnosis head, the optimiser, the scheduler, the loss.

:func:`build_training` is the one place the model is created and wrapped (``compile``;
a distributed wrapper belongs in :func:`wrap_for_training` too), so the loop sees one
:class:`Training` whatever the device or the number of processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed.adapt.config import AdaptConfig
from cxrembed.labels import NUM_CLASSES

if TYPE_CHECKING:
    import torch

    from cxrembed.model import AdaptedCLIP

log = logging.getLogger(__name__)


@dataclass
class Training:
    """The model and what steps it. ``forward`` is what batches go through (the model
    itself, or a compiled / distributed wrapper of it); ``model`` is the bare
    :class:`~cxrembed.model.AdaptedCLIP` whose weights are saved and restored."""

    model: AdaptedCLIP
    forward: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pos_weight: torch.Tensor | None
    trainable_params: int

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


def wrap_for_training(model: AdaptedCLIP, config: AdaptConfig, device: torch.device) -> Any:
    """Move ``model`` to ``device`` and return what the loop calls (compiled if asked)."""
    import torch

    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def build_training(clip: torch.nn.Module, config: AdaptConfig, device: torch.device,
                   train_labels: np.ndarray, train_known: np.ndarray | None = None
                   ) -> Training:
    """Model (one head output per column of ``train_labels``), AdamW (encoder and head
    groups), ReduceLROnPlateau on val AUC, the loss's positive weights (from the train
    split's known labels only, when ``config.class_weights``)."""
    import torch

    from cxrembed.model import count_trainable

    model = build_model(clip, config, int(train_labels.shape[1]))
    trainable = count_trainable(model)
    log.info("%s, unfreeze %d: %s trainable parameters", config.model, config.unfreeze,
             f"{trainable:,}")
    forward = wrap_for_training(model, config, device)
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
    return Training(model, forward, optimizer, scheduler, pos_weight, trainable)
