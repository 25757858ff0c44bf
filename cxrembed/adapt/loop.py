"""The training loop: epochs of shuffled batches, val AUC after each, a commit per epoch.

Randomness is a pure function of ``(seed, epoch)`` (shuffle, augmentation draws, dropout),
so an epoch replayed after a kill gives the same weights. Three things a distributed
(torchrun) version changes are each in one place: the batch order (:func:`epoch_batches`),
the model wrapping (:func:`cxrembed.adapt.build.wrap_for_training`) and the writes of the
run folder (:func:`commit_epoch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed.adapt.build import Training
from cxrembed.adapt.config import AdaptConfig
from cxrembed.adapt.evaluate import (auc_dict, auc_report, autocast, batch_loader,
                                     evaluate_split, prepare_input)
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS

if TYPE_CHECKING:
    import torch

    from cxrembed.model.run_state import RunState

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised by an ``on_step`` callback to stop a run as a kill would (used by tests)."""


@dataclass
class EpochData:
    """What every epoch reads: the image source, the label matrix, the rows per split, and
    which labels are known (None: all; unknown ones get no loss and no AUC weight)."""

    source: Any
    labels: np.ndarray
    rows: dict[str, np.ndarray]
    known: np.ndarray | None = None
    label_names: tuple[str, ...] = LABELS


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def epoch_batches(train_rows: np.ndarray, config: AdaptConfig, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled row batches (the sampler: a pure function of seed and epoch)."""
    order = np.random.default_rng([config.seed, epoch]).permutation(train_rows)
    return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]


def early_stop_message(state: RunState, config: AdaptConfig) -> str:
    """``stopped early at epoch 6 of 10: no val AUC gain for 5 epochs (best 0.71 at 1)``."""
    return (f"stopped early at epoch {state.epochs_done} of {config.epochs}: no val AUC gain "
            f"for {state.bad_epochs} epochs (best {state.best_value:.4f} at epoch "
            f"{state.best_epoch})")


def _augmenter(config: AdaptConfig) -> Callable | None:
    from cxrembed.data.transforms import TrainAugment

    if not config.augment:
        return None
    return TrainAugment(hflip=config.aug_hflip, degrees=config.aug_degrees,
                        translate=config.aug_translate,
                        scale=(config.aug_scale_min, config.aug_scale_max),
                        brightness=config.aug_brightness, contrast=config.aug_contrast,
                        saturation=config.aug_saturation)


def _train_step(training: Training, config: AdaptConfig, dev: torch.device, x: torch.Tensor,
                targets: torch.Tensor, known: torch.Tensor, where: str) -> torch.Tensor:
    import torch

    from cxrembed.model.loss import focal_bce_with_logits

    with autocast(config, dev):
        logits = training.forward(prepare_input(x, config, dev))
    loss = focal_bce_with_logits(logits, targets, alpha=config.focal_alpha,
                                 gamma=config.focal_gamma, pos_weight=training.pos_weight,
                                 known=known)
    if not torch.isfinite(loss):
        raise ConfigError(f"the loss became {loss.item()} at {where}; lower --lr-encoder / "
                          "--lr-head")
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(training.trainable, config.grad_clip)
    training.optimizer.step()
    return loss


def train_epoch(training: Training, config: AdaptConfig, dev: torch.device, data: EpochData,
                epoch: int, progress: bool, on_step: Callable[[int, int], None] | None
                ) -> tuple[float, int, float]:
    """One pass over the train split: (mean loss, images seen, seconds)."""
    import torch

    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.progress import progress_bar

    seed = epoch_seed(config.seed, epoch)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # augmentation
    augment = _augmenter(config)
    batches = epoch_batches(data.rows["train"], config, epoch)
    training.model.train()
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    loader = batch_loader(data.source, data.labels, batches, config.loader_workers,
                          dev.type == "cuda", data.known)
    total = sum(len(b) for b in batches)
    with progress_bar(total, f"epoch {epoch}/{config.epochs}", enabled=progress) as advance:
        for step, (images, targets, known) in enumerate(loader, start=1):
            images = images.to(dev, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            known = known.to(dev, non_blocking=True)
            x = augment(images, generator=generator) if augment is not None else \
                to_clip_tensor(images, device=dev)
            loss = _train_step(training, config, dev, x, targets, known,
                               f"epoch {epoch}, step {step}")
            loss_sum += loss.item() * len(images)
            seen += len(images)
            advance(len(images), loss=loss_sum / seen)
            if on_step is not None:
                on_step(epoch, step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


def commit_epoch(out: Path, state: RunState, training: Training, record: dict) -> None:
    """Every write of an epoch end (on one process only, in a distributed run)."""
    from cxrembed.model.run_state import append_jsonl

    state.save(out / "state", training.model, training.optimizer, training.scheduler)
    append_jsonl(out / "metrics.jsonl", record)


def run_epochs(training: Training, state: RunState, config: AdaptConfig, dev: torch.device,
               data: EpochData, out: Path, progress: bool,
               on_step: Callable[[int, int], None] | None) -> None:
    """Train until ``config.epochs`` or early stopping, committing after every epoch."""
    val_labels = data.labels[data.rows["val"]]
    val_known = None if data.known is None else data.known[data.rows["val"]]
    while state.epochs_done < config.epochs and not state.stopped_early:
        epoch = state.epochs_done + 1
        optimizer = training.optimizer
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        loss, seen, seconds = train_epoch(training, config, dev, data, epoch, progress, on_step)
        scores = evaluate_split(training.forward, data.source, data.labels, data.rows["val"],
                                "val", config, dev, progress)
        aucs, mean, _ = auc_report(val_labels, scores, val_known, data.label_names)
        training.scheduler.step(mean)
        record = {"epoch": epoch, "train_loss": loss, "val_auc": auc_dict(aucs, data.label_names),
                  "val_mean_auc": mean, "lr": lrs, "images_per_s": seen / seconds,
                  "train_seconds": seconds}
        state.end_epoch(training.model, optimizer, training.scheduler, record,
                        config.early_stop_patience)
        record["best_epoch"] = state.best_epoch
        if state.stopped_early:
            record["stopped_early"] = early_stop_message(state, config)
        commit_epoch(out, state, training, record)
        log.info("epoch %d: loss %.4f, val mean AUC %.4f (best %.4f at epoch %d), %.0f img/s",
                 epoch, loss, mean, state.best_value, state.best_epoch, record["images_per_s"])
        if state.stopped_early:
            log.info("%s", record["stopped_early"])
