"""The training loop: epochs of shuffled batches, val AUC after each, a commit per epoch.

Randomness is a pure function of ``(seed, epoch)`` (shuffle, augmentation draws, dropout),
so an epoch replayed after a kill gives the same weights.

Under ``torchrun`` (N processes) the run is the same run, not N smaller ones: the global
batch stays ``batch_size`` and each rank takes a contiguous slice of it
(:func:`rank_steps`); augmentation and dropout are drawn for the global batch and sliced
(:mod:`cxrembed.adapt.draws`); each rank's loss is weighted by its share of the batch, so
DDP's gradient average is the gradient of the global batch's mean loss (the last,
shorter batch included: nothing is padded or dropped, as DistributedSampler would); only
rank 0 writes (:func:`commit_epoch`).
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
from cxrembed.distributed import Launch, sum_over_ranks
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


@dataclass(frozen=True)
class RankStep:
    """One optimiser step as one rank sees it: its rows of the global batch."""

    rows: np.ndarray  # dataset rows this rank trains on
    size: int  # rows in the global batch
    offset: int  # where ``rows`` start in it
    share: float  # this rank's part of the batch's loss (0 for a stand-in row)
    stand_in: bool = False  # a row borrowed only to join the all-reduce (not counted)


def rank_steps(batches: list[np.ndarray], launch: Launch,
               known: np.ndarray | None = None) -> list[RankStep]:
    """This rank's contiguous slice of every global batch (all of it for one process).

    A rank's share of the batch's loss is its share of the batch's known label cells
    (the loss is a mean over them; all known: its share of the rows). The last batch may
    be shorter than the others and not divisible by the number of ranks: slices then
    differ by one row, and a rank left without a row trains on a stand-in (the batch's
    last row) with weight 0, as every rank must take part in the gradient all-reduce.
    """
    cells = None if known is None else np.asarray(known, dtype=bool).sum(axis=1)
    steps = []
    for batch in batches:
        parts = np.array_split(batch, launch.world_size)
        mine = parts[launch.rank]
        offset = sum(len(p) for p in parts[:launch.rank])
        if not len(mine):
            steps.append(RankStep(batch[-1:], len(batch), len(batch) - 1, 0.0, stand_in=True))
            continue
        share = len(mine) / len(batch)
        if cells is not None and cells[batch].sum() > 0:
            share = float(cells[mine].sum() / cells[batch].sum())
        steps.append(RankStep(mine, len(batch), offset, share))
    return steps


def check_global_batch(config: AdaptConfig, launch: Launch) -> None:
    """ConfigError unless ``batch_size`` splits evenly over the ranks; logs the split."""
    if not launch.distributed:
        return
    world = launch.world_size
    if config.batch_size % world:
        nearest = world * max(1, round(config.batch_size / world))
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch and must split evenly "
            f"over the {world} processes of this torchrun job; use a multiple of {world}, "
            f"e.g. {nearest}")
    log.info("global batch %d = %d processes x %d images", config.batch_size,
             launch.world_size, config.batch_size // launch.world_size)


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
                targets: torch.Tensor, known: torch.Tensor, weight: float, where: str
                ) -> torch.Tensor:
    """One optimiser step; ``weight`` scales this rank's loss (its share of the global
    batch times the number of ranks, since DDP averages the ranks' gradients)."""
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
    (loss * weight if weight != 1 else loss).backward()
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
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # augmentation
    if training.draws is not None:
        training.draws.reseed(epoch_seed(seed, 1))  # dropout
    augment = _augmenter(config)
    launch = training.launch
    steps = rank_steps(epoch_batches(data.rows["train"], config, epoch), launch, data.known)
    training.model.train()
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    loader = batch_loader(data.source, data.labels, [s.rows for s in steps],
                          config.loader_workers, dev.type == "cuda", data.known)
    total = sum(len(s.rows) for s in steps)
    with progress_bar(total, f"epoch {epoch}/{config.epochs}",
                      enabled=progress and launch.main) as advance:
        for (step, (images, targets, known)), part in zip(enumerate(loader, start=1), steps):
            images = images.to(dev, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            known = known.to(dev, non_blocking=True)
            if training.draws is not None:
                training.draws.step(part.size, part.offset)
            x = augment(images, generator=generator, draw=(part.size, part.offset)) \
                if augment is not None else to_clip_tensor(images, device=dev)
            loss = _train_step(training, config, dev, x, targets, known,
                               part.share * launch.world_size, f"epoch {epoch}, step {step}")
            # The global batch's mean loss is the sum over ranks of share x rank mean.
            loss_sum += loss.item() * part.share * part.size
            seen += 0 if part.stand_in else len(images)
            advance(len(images), loss=loss_sum / max(seen, 1))
            if on_step is not None:
                on_step(epoch, step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    loss_sum, seen = sum_over_ranks([loss_sum, seen])
    return loss_sum / max(seen, 1), int(seen), time.perf_counter() - start


def commit_epoch(out: Path, state: RunState, training: Training, record: dict) -> None:
    """Every write of an epoch end (by rank 0 only under torchrun)."""
    from cxrembed.model.run_state import append_jsonl

    if not training.launch.main:
        return
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
        scores = evaluate_split(training.infer, data.source, data.labels, data.rows["val"],
                                "val", config, dev, progress and training.launch.main)
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
