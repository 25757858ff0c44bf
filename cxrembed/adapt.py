"""Domain adaptation: fine-tune CLIP's top visual blocks with the paper's head.

``adapt(data, out, config)`` trains on the train split, selects on **val** (scheduler,
early stopping, best weights) and evaluates test **once**, at the end, with the best
weights. Everything it needs to continue after a kill is in the run folder::

    RUN/
      config.json          the resolved AdaptConfig + data identity + base weights
      metrics.jsonl        one JSON line per epoch; one final line for test
      state/               resume state, written atomically at every epoch end
        progress.json      the commit point: epochs done, scheduler, best, history, files
        trainable-NNN.safetensors   trainable weights after epoch NNN
        optimizer-NNN.safetensors   AdamW moments after epoch NNN (+ JSON in progress)
        best-NNN.safetensors        trainable weights of the best val epoch so far
      model.safetensors    the adapted encoder (best epoch): what `encode` loads
      model.json           its metadata (see cxrembed.model.adapted)
      summary.json         per-class val and test AUC, best epoch, counts

Randomness is a pure function of ``(seed, epoch)`` (shuffle, augmentation draws, dropout),
so a run killed mid-epoch and resumed replays that epoch exactly from the last epoch
checkpoint and ends with the same weights and metrics as an uninterrupted run (on the
CPU; CUDA kernels are not all bitwise deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed import __version__
from cxrembed.data.splits import SPLITS
from cxrembed.device import resolve_device
from cxrembed.errors import ConfigError, DataError
from cxrembed.labels import LABELS

if TYPE_CHECKING:
    import torch

# torch and open_clip are imported inside the functions that use them: importing this
# module (the CLI does, for the options' help) stays fast.

log = logging.getLogger(__name__)


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" is what typer calls it
    return field(default=default, metadata={"help": help})


@dataclass
class AdaptConfig:
    """Every hyper-parameter of a run; defaults are the paper's unless marked otherwise."""

    # model
    model: str = _opt("ViT-B-32", "open_clip architecture (cxr-tiny for tests and demos)")
    pretrained: str = _opt("openai", "open_clip tag, local weights file, or 'none'")
    quick_gelu: bool | None = _opt(None, "force QuickGELU on/off (default: from the tag, or "
                                   "detected from the file)")
    unfreeze: int = _opt(3, "top visual blocks to train (plus ln_post and proj)")
    # optimisation
    epochs: int = _opt(20, "maximum epochs (not stated by the paper; early stopping ends "
                       "most runs sooner)")
    batch_size: int = _opt(32, "training batch size")
    lr_encoder: float = _opt(1e-5, "AdamW learning rate of the unfrozen CLIP weights")
    lr_head: float = _opt(1e-4, "AdamW learning rate of the head")
    weight_decay: float = _opt(1e-2, "AdamW weight decay (both groups)")
    grad_clip: float = _opt(1.0, "gradient norm clipping (0 disables)")
    focal_alpha: float = _opt(0.25, "focal loss alpha (weight of positives)")
    focal_gamma: float = _opt(2.0, "focal loss gamma")
    class_weights: bool = _opt(False, "up-weight positives by negatives/positives, computed "
                               "on the train split only")
    plateau_factor: float = _opt(0.5, "ReduceLROnPlateau factor (on val mean AUC)")
    plateau_patience: int = _opt(2, "ReduceLROnPlateau patience, epochs")
    early_stop_patience: int = _opt(5, "stop after this many epochs without a val AUC gain "
                                    "(cxrembed's default; the paper gives none)")
    seed: int = _opt(7, "seed of the head init, shuffling, augmentation and dropout")
    head_dropout1: float = _opt(0.3, "head dropout after the first hidden layer")
    head_dropout2: float = _opt(0.2, "head dropout after the second hidden layer")
    # augmentation (the paper's; applied on tensors, on the GPU when there is one)
    augment: bool = _opt(True, "apply the training augmentation")
    aug_hflip: float = _opt(0.5, "horizontal flip probability")
    aug_degrees: float = _opt(10.0, "rotation range, ± degrees")
    aug_translate: float = _opt(0.1, "translation range, ± fraction of the size")
    aug_scale_min: float = _opt(0.9, "smallest scale")
    aug_scale_max: float = _opt(1.1, "largest scale")
    aug_brightness: float = _opt(0.2, "brightness jitter, ±")
    aug_contrast: float = _opt(0.2, "contrast jitter, ±")
    aug_saturation: float = _opt(0.1, "saturation jitter (no effect on gray images)")
    # data
    view: str = _opt("all", "views to use: all, PA or AP")
    val_fraction: float = _opt(0.1, "share of train_val patients held out for val")
    split_seed: int = _opt(7, "seed of the patient-level train/val split")
    allow_missing: bool = _opt(False, "continue with the images present when some are missing")
    # speed (no effect on the result, except compile and amp on CUDA)
    workers: int = _opt(4, "image-reading worker processes (0: read in the main process)")
    eval_batch_size: int = _opt(256, "batch size of val/test evaluation")
    amp: bool = _opt(True, "bf16 autocast on CUDA")
    channels_last: bool = _opt(True, "channels-last memory layout on CUDA")
    compile: bool = _opt(False, "torch.compile the model (CUDA; slow first epoch)")

    #: Fields that may change when resuming (they do not change what is computed).
    RESUMABLE = ("epochs", "workers")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdaptConfig":
        """Build from a mapping; unknown keys raise ConfigError naming the valid ones."""
        from cxrembed.config import from_mapping

        config = from_mapping(cls, values, "adapt")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)

    def validate(self) -> None:
        """ConfigError naming the first out-of-range value."""
        checks = [
            ("unfreeze", self.unfreeze >= 0, ">= 0"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("lr_encoder", self.lr_encoder >= 0, ">= 0"),
            ("lr_head", self.lr_head > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("focal_alpha", 0 <= self.focal_alpha <= 1, "in [0, 1]"),
            ("focal_gamma", self.focal_gamma >= 0, ">= 0"),
            ("plateau_factor", 0 < self.plateau_factor < 1, "in (0, 1)"),
            ("plateau_patience", self.plateau_patience >= 0, ">= 0"),
            ("early_stop_patience", self.early_stop_patience >= 1, ">= 1"),
            ("head_dropout1", 0 <= self.head_dropout1 < 1, "in [0, 1)"),
            ("head_dropout2", 0 <= self.head_dropout2 < 1, "in [0, 1)"),
            ("aug_hflip", 0 <= self.aug_hflip <= 1, "in [0, 1]"),
            ("aug_scale_min", 0 < self.aug_scale_min <= self.aug_scale_max,
             "in (0, aug_scale_max]"),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("view", self.view in ("all", "PA", "AP"), "all, PA or AP"),
            ("workers", self.workers >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"adapt option {name}={getattr(self, name)!r} is out of "
                                  f"range; expected {expected}")


@dataclass
class AdaptResult:
    """What a run ended with (also written to RUN/summary.json)."""

    out: Path
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    trainable_params: int
    val_auc: dict[str, float | None]  # at the best epoch; None where undefined
    val_mean_auc: float
    test_auc: dict[str, float | None]
    test_mean_auc: float | None
    undefined: dict[str, list[str]]  # split -> classes without positives or negatives
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out


# ---------------------------------------------------------------------------------------
# Evaluation


def auc_report(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float, list[str]]:
    """Per-class AUC (NaN where undefined), their mean over defined classes, the undefined."""
    from cxrembed.metrics import mean_auc, per_class_auc

    aucs = per_class_auc(labels, scores, names=LABELS, warn=False)
    undefined = [LABELS[i] for i in np.flatnonzero(np.isnan(aucs))]
    return aucs, mean_auc(aucs, warn=False), undefined


def _auc_dict(aucs: np.ndarray) -> dict[str, float | None]:
    return {name: (None if math.isnan(a) else round(float(a), 6)) for name, a in zip(LABELS, aucs)}


def undefined_classes(labels: np.ndarray) -> list[str]:
    """Classes with no positives or no negatives among ``labels`` rows (AUC undefined)."""
    pos = labels.sum(axis=0)
    return [LABELS[i] for i in np.flatnonzero((pos == 0) | (pos == len(labels)))]


class _Batches:
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


def _loader(source: Any, labels: np.ndarray, batches: list[np.ndarray], workers: int,
            cuda: bool) -> torch.utils.data.DataLoader:
    import torch

    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda, "batch_size": None}
    if workers:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(_Batches(source, labels, batches), **kwargs)


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
    with torch.inference_mode(), progress_bar(len(rows), f"{split}", enabled=progress) as advance:
        for images, _ in _loader(source, labels, batches, config.workers, device.type == "cuda"):
            x = _prepare(to_clip_tensor(images, device=device), config, device)
            with _autocast(config, device):
                out.append(model(x).float().cpu())
            advance(len(images))
    log.debug("evaluated %d %s images", len(rows), split)
    return torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)), np.float32)


def _prepare(x: torch.Tensor, config: AdaptConfig, device: torch.device) -> torch.Tensor:
    import torch

    if device.type == "cuda" and config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _autocast(config: AdaptConfig, device: torch.device):
    from contextlib import nullcontext

    import torch

    if device.type == "cuda" and config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------
# Training


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


class TrainingInterrupted(Exception):
    """Raised by an ``on_step`` callback to stop a run as a kill would (used by tests)."""


def adapt(data: Any, out: str | os.PathLike, config: AdaptConfig | None = None, *,
          pixel_cache: str | os.PathLike | None = None, resume: bool = False,
          overwrite: bool = False, device: str | None = None, progress: bool = True,
          trust_pickle: bool = False, csv_path: str | os.PathLike | None = None,
          train_val_list: str | os.PathLike | None = None,
          test_list: str | os.PathLike | None = None,
          on_start: Callable[[dict], None] | None = None,
          on_step: Callable[[int, int], None] | None = None) -> AdaptResult:
    """Adapt CLIP to the dataset and write the run folder ``out`` (see the module doc).

    Args:
        data: an NIH data folder, or an already loaded :class:`~cxrembed.data.nih.NIHDataset`.
        config: hyper-parameters (default: the paper's).
        pixel_cache: a pixel cache of the dataset (no PNG decoding per epoch).
        resume: continue the run in ``out`` (or return its result when finished).
        overwrite: replace the run in ``out``.
        device: ``cuda``, ``cpu``, ... (default: CUDA when available).
        trust_pickle: allow a weights file with pickled objects (see cxrembed.model).
        csv_path, train_val_list, test_list: copies elsewhere of the official files.
        on_start: called once training is set up, with a dict of what was set up (model,
            weights, device, trainable_params, unfreeze, images per split).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step.
    """
    import torch

    from cxrembed.data.cache import ImageSource
    from cxrembed.data.nih import load_nih
    from cxrembed.model import AdaptedCLIP, MLPHead, count_trainable, create_clip
    from cxrembed.files import atomic_write_text
    from cxrembed.model.run_state import (RunState, data_identity,
                                          prepare_run_dir, read_progress, rewrite_metrics)

    config = config or AdaptConfig()
    config.validate()
    out = Path(out)
    dev = resolve_device(device)
    if isinstance(data, (str, os.PathLike)):
        dataset = load_nih(data, csv_path=csv_path, train_val_list=train_val_list,
                           test_list=test_list, view=config.view, val_fraction=config.val_fraction,
                           seed=config.split_seed,
                           missing="drop" if config.allow_missing else "error")
    else:
        dataset = data
    rows = {s: dataset.split_rows(s) for s in SPLITS}
    for split in ("train", "val"):
        if not len(rows[split]):
            raise DataError(f"the {split} split is empty ({len(dataset)} images in all); adapt "
                            "needs train and val images")
    undefined = {s: undefined_classes(dataset.labels[rows[s]]) for s in ("val", "test")}
    if len(undefined["val"]) == len(LABELS):
        raise DataError("no class has both positives and negatives in val: val AUC is undefined "
                        "for every class, so nothing can be selected; use more images or a "
                        "larger --val-fraction")
    if undefined["val"]:
        log.warning("val has no positives (or no negatives) of %s: their AUC is undefined and "
                    "left out of the mean used for selection", ", ".join(undefined["val"]))

    identity = {"config": config.to_dict(), "data": data_identity(dataset),
                "data_root": str(dataset.root), "cxrembed_version": __version__}
    previous = prepare_run_dir(out, identity, resume, overwrite, AdaptConfig.RESUMABLE)
    state_dir = out / "state"
    progress_state = read_progress(state_dir) if previous is not None else None
    if previous is not None:
        if progress_state and progress_state.get("complete"):
            if previous["config"].get("epochs") != config.epochs:
                raise ConfigError(f"{out} is a finished run (its test split has been evaluated); "
                                  "training it further would let test results steer it. Start "
                                  "a new run with --epochs instead")
            log.info("%s is complete; returning its result", out)
            return _result_from_summary(out)
        previous["config"] = identity["config"]  # resumable fields may have changed
        atomic_write_text(out / "config.json", json.dumps(previous, indent=2))

    # Model: weights are the same every time; the head's init depends on the seed only.
    clip, source = create_clip(config.model, config.pretrained, trust_pickle=trust_pickle,
                               quick_gelu=config.quick_gelu)
    base = source.fingerprint()
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "base_weights" in saved and saved["base_weights"] != base:
        raise ConfigError(f"the weights {config.pretrained} differ from those {out} was started "
                          f"with ({saved['base_weights']} vs {base}); pass the same file or "
                          "--overwrite")
    if "base_weights" not in saved:
        saved["base_weights"] = base
        atomic_write_text(out / "config.json", json.dumps(saved, indent=2))
    torch.manual_seed(config.seed)
    head = MLPHead(dropout=(config.head_dropout1, config.head_dropout2),
                   in_dim=int(clip.visual.proj.shape[1]) if clip.visual.proj is not None else 512)
    model = AdaptedCLIP(clip, head, config.unfreeze)
    trainable = count_trainable(model)
    log.info("%s (%s), unfreeze %d: %s trainable parameters", config.model, source.kind,
             config.unfreeze, f"{trainable:,}")
    model.to(dev)
    if dev.type == "cuda" and config.channels_last:
        model.clip.visual.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [{"params": model.encoder_parameters(), "lr": config.lr_encoder, "name": "encoder"},
         {"params": model.head_parameters(), "lr": config.lr_head, "name": "head"}],
        weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience)

    state = RunState.fresh() if progress_state is None else RunState.load(
        state_dir, progress_state, model, optimizer, scheduler)
    rewrite_metrics(out / "metrics.jsonl", state.epochs_done)

    source_images = ImageSource(dataset, pixel_cache)
    labels = dataset.labels
    pos_weight = None
    if config.class_weights:
        from cxrembed.model.loss import train_pos_weight

        pos_weight = torch.from_numpy(train_pos_weight(labels[rows["train"]])).to(dev)
    forward = torch.compile(model) if config.compile else model
    if on_start is not None:
        on_start({"model": config.model, "weights": source.describe(),
                  "device": str(dev), "trainable_params": trainable, "unfreeze": config.unfreeze,
                  "epochs_done": state.epochs_done,
                  **{split: int(len(r)) for split, r in rows.items()}})
    _train_epochs(forward, model, optimizer, scheduler, state, config, dev, source_images,
                  labels, rows, pos_weight, out, progress, on_step)

    # Test: once, with the best weights, never used for any choice.
    model.load_trainable_state_dict(state.best_weights)
    best = state.history[state.best_epoch - 1]
    test_scores = None
    if len(rows["test"]):
        test_scores = evaluate_split(forward, source_images, labels, rows["test"], "test",
                                     config, dev, progress)
    return _finish(out, model, config, source, base, state, best, trainable, undefined,
                   labels[rows["test"]] if test_scores is not None else None, test_scores)


def _train_epochs(forward: Any, model: Any, optimizer: Any, scheduler: Any, state: Any,
                  config: AdaptConfig, dev: torch.device, source: Any, labels: np.ndarray,
                  rows: dict[str, np.ndarray], pos_weight: torch.Tensor | None, out: Path,
                  progress: bool, on_step: Callable[[int, int], None] | None) -> None:
    import torch

    from cxrembed.data.transforms import TrainAugment, to_clip_tensor
    from cxrembed.model.loss import focal_bce_with_logits
    from cxrembed.model.run_state import append_jsonl
    from cxrembed.progress import progress_bar

    augment = TrainAugment(hflip=config.aug_hflip, degrees=config.aug_degrees,
                           translate=config.aug_translate,
                           scale=(config.aug_scale_min, config.aug_scale_max),
                           brightness=config.aug_brightness, contrast=config.aug_contrast,
                           saturation=config.aug_saturation)
    params = [p for p in model.parameters() if p.requires_grad]
    val_labels = labels[rows["val"]]
    while state.epochs_done < config.epochs and not state.stopped_early:
        epoch = state.epochs_done + 1
        seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)  # augmentation
        order = np.random.default_rng([config.seed, epoch]).permutation(rows["train"])
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        model.train()
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        desc = f"epoch {epoch}/{config.epochs}"
        with progress_bar(len(order), desc, enabled=progress) as advance:
            loader = _loader(source, labels, batches, config.workers, dev.type == "cuda")
            for step, (images, targets) in enumerate(loader, start=1):
                images = images.to(dev, non_blocking=True)
                targets = targets.to(dev, non_blocking=True)
                x = augment(images, generator=generator) if config.augment else \
                    to_clip_tensor(images, device=dev)
                with _autocast(config, dev):
                    logits = forward(_prepare(x, config, dev))
                loss = focal_bce_with_logits(logits, targets, alpha=config.focal_alpha,
                                             gamma=config.focal_gamma, pos_weight=pos_weight)
                if not torch.isfinite(loss):
                    raise ConfigError(f"the loss became {loss.item()} at epoch {epoch}, step "
                                      f"{step}; lower --lr-encoder / --lr-head")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                loss_sum += loss.item() * len(images)
                seen += len(images)
                advance(len(images), loss=loss_sum / seen)
                if on_step is not None:
                    on_step(epoch, step)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - start
        scores = evaluate_split(forward, source, labels, rows["val"], "val", config, dev, progress)
        aucs, mean, _ = auc_report(val_labels, scores)
        scheduler.step(mean)
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_auc": _auc_dict(aucs),
                  "val_mean_auc": mean, "lr": lrs, "images_per_s": seen / train_seconds,
                  "train_seconds": train_seconds}
        state.end_epoch(model, optimizer, scheduler, record, config.early_stop_patience)
        record["best_epoch"] = state.best_epoch
        state.save(out / "state", model, optimizer, scheduler)
        append_jsonl(out / "metrics.jsonl", record)
        log.info("epoch %d: loss %.4f, val mean AUC %.4f (best %.4f at epoch %d), %.0f img/s",
                 epoch, record["train_loss"], mean, state.best_value, state.best_epoch,
                 record["images_per_s"])


def _finish(out: Path, model: Any, config: AdaptConfig, source: Any, base: dict, state: Any,
            best: dict, trainable: int, undefined: dict, test_labels: np.ndarray | None,
            test_scores: np.ndarray | None) -> AdaptResult:
    from cxrembed.model.adapted import save_adapted
    from cxrembed.files import atomic_write_text
    from cxrembed.model.run_state import append_jsonl

    test_auc: dict[str, float | None] = {name: None for name in LABELS}
    test_mean = None
    if test_scores is not None:
        aucs, test_mean, _ = auc_report(test_labels, test_scores)
        test_auc = _auc_dict(aucs)
        if undefined["test"]:
            log.warning("test has no positives (or no negatives) of %s: their AUC is undefined "
                        "and left out of the mean", ", ".join(undefined["test"]))
        test_mean = None if math.isnan(test_mean) else test_mean
    else:
        log.warning("the test split is empty: no test AUC")
    append_jsonl(out / "metrics.jsonl", {"split": "test", "best_epoch": state.best_epoch,
                                          "test_auc": test_auc, "test_mean_auc": test_mean})
    result = AdaptResult(out=out, best_epoch=state.best_epoch, epochs_run=state.epochs_done,
                         stopped_early=state.stopped_early, trainable_params=trainable,
                         val_auc=best["val_auc"], val_mean_auc=best["val_mean_auc"],
                         test_auc=test_auc, test_mean_auc=test_mean, undefined=undefined,
                         history=state.history)
    save_adapted(out, model, model_name=config.model, base_weights=base,
                 extra={"best_epoch": state.best_epoch, "val_mean_auc": best["val_mean_auc"],
                        "test_mean_auc": test_mean, "trainable_params": trainable,
                        "cxrembed_version": __version__})
    atomic_write_text(out / "summary.json", json.dumps(result.to_dict(), indent=2))
    state.complete = True
    state.save(out / "state", None, None, None)
    return result


def _result_from_summary(out: Path) -> AdaptResult:
    values = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    values["out"] = Path(values["out"])
    return AdaptResult(**values)
