"""The hyper-parameters of an adaptation run: one dataclass, from flags, files or code.

Importing this module stays cheap (no torch): the CLI reads it for the options' help.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrembed.errors import ConfigError

#: Most image-reading processes a default run starts (more only adds memory).
MAX_DEFAULT_WORKERS = 4


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" is what typer calls it
    return field(default=default, metadata={"help": help})


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Reading processes for ``workers=None``: one core is left to the training process,
    at most :data:`MAX_DEFAULT_WORKERS` (0 on a one-core machine: read in the main process).
    More than the machine has only makes PyTorch warn and the processes wait on each other.
    """
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() - 1))


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
    view: str = _opt("all", "views to use: all, frontal, lateral, or view values "
                     "comma-separated (PA,AP)")
    val_fraction: float = _opt(0.1, "share of train_val patients held out for val (where the "
                               "collection ships no val split)")
    split_seed: int = _opt(7, "seed of the patient-level train/val split")
    allow_missing: bool = _opt(False, "continue with the images present when some are missing")
    # speed (no effect on the result, except compile and amp on CUDA)
    workers: int | None = _opt(None, "image-reading worker processes (0: read in the main "
                               "process; default: the usable CPUs less one, at most 4)")
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

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None
                  ) -> "AdaptConfig":
        """Read a JSON file of option values (a run's ``config.json`` works too: its
        ``config`` entry is used), apply ``overrides`` (values None are ignored), build.

        ConfigError naming the file when it cannot be read, is not a JSON object, or holds
        an unknown key or an out-of-range value.
        """
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the adapt config file {path}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"the adapt config file {path} holds a JSON "
                              f"{type(values).__name__}; expected an object of option values "
                              "such as {\"epochs\": 10}")
        values = values.get("config", values)  # a run folder's config.json
        if not isinstance(values, dict):
            raise ConfigError(f"the adapt config file {path}: its \"config\" entry is a JSON "
                              f"{type(values).__name__}; expected an object of option values")
        values = dict(values, **{k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def loader_workers(self) -> int:
        """``workers``, or :func:`default_workers` when it is None."""
        return default_workers() if self.workers is None else self.workers

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
            ("view", isinstance(self.view, str) and bool(self.view.strip()),
             "all, frontal, lateral or view values such as PA,AP"),
            ("workers", self.workers is None or self.workers >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"adapt option {name}={getattr(self, name)!r} is out of "
                                  f"range; expected {expected}")
