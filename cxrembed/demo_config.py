"""What ``cxrembed demo`` runs (:class:`DemoConfig`) and the checks on it.

The demo runs on a synthetic NIH twin by default, or on any collection the readers take
(``data`` with ``data_options``: ``dataset`` and the reader options, as the data commands
take them); everything below the reader uses that collection's own label set.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrembed.errors import ConfigError


@dataclass
class DemoConfig:
    """What the demo runs. Defaults: the synthetic twin and the tiny model on a CPU."""

    # A data folder of any collection (or, with dataset csv, the CSV); None: write a
    # synthetic NIH twin.
    data: str | None = None
    # How to read ``data``: the options of every data command (see cxrembed.data).
    csv: str | None = None  # metadata CSV kept elsewhere
    train_val_list: str | None = None
    test_list: str | None = None
    view: str = "all"
    # None: 0.25 on the twin, 0.1 (the paper's) on real data. The twin's val split at 10%
    # is ~130 images with 1 positive of several classes: its mean AUC moves by several
    # points from noise alone.
    val_fraction: float | None = None
    split_seed: int = 7
    allow_missing: bool = False  # continue with the images on disk (a partial download)
    # ``dataset`` (default auto) and reader options of cxrembed.data.load_dataset
    # (uncertain, blank, test_fraction, image_col, label_cols, ...); values None are unset.
    data_options: dict[str, Any] = field(default_factory=dict)
    images: int = 2000  # twin size
    size: int = 128  # twin PNG side
    seed: int = 0  # twin seed
    model: str = "cxr-tiny"
    pretrained: str = "none"
    # The tiny model starts from random weights, so its encoder needs larger steps than
    # the paper's 1e-5 for pretrained CLIP, and all 4 of its blocks (the paper: top 3 of
    # 12); real runs (model != cxr-tiny) use the paper's settings. Measured on the default
    # twin (see tests/test_demo.py): with the head 10x faster than the encoder (the
    # earlier 3e-3 / 1e-2) the head fits the random features at once, val AUC peaks at
    # epoch 1 and falls, and the store keeps the random encoder's near-identical vectors
    # (mean pairwise cosine 0.996, as the frozen one); with the encoder 10x faster than the
    # head (1e-3 / 1e-4) the encoder has to carry the signal, its vectors spread out
    # and val AUC climbs for several epochs.
    epochs: int = 10
    lr_encoder: float | None = None
    lr_head: float | None = None
    unfreeze: int | None = None
    batch_size: int = 32
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 10
    heads: tuple[str, ...] = ("mlp", "linear", "knn", "tip", "zeroshot")
    searches: int = 3
    device: str = "auto"
    workers: int | None = None  # image-reading processes; None: 0 on a CPU, 4 on a GPU

    @property
    def synthetic(self) -> bool:
        return self.data is None

    @property
    def reader_options(self) -> dict[str, Any]:
        """The data options that are set (``dataset`` only when not ``auto``)."""
        return {k: v for k, v in self.data_options.items()
                if v is not None and not (k == "dataset" and v == "auto")}

    @property
    def split_val_fraction(self) -> float:
        """Share of train_val patients held out for val (0.25 on the twin, else 0.1)."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.25 if self.synthetic else 0.1

    def data_flags(self) -> str:
        """The data options as `cxrembed` flags, for the commands the demo shows."""
        flags = [f"--{name.replace('_', '-')} {shlex.quote(str(value))}" for name, value in (
            ("csv", self.csv), ("train_val_list", self.train_val_list),
            ("test_list", self.test_list), *self.reader_options.items()) if value is not None]
        defaults = DemoConfig()
        flags += [f"--{name.replace('_', '-')} {shlex.quote(str(getattr(self, name)))}"
                  for name in ("view", "split_seed")
                  if getattr(self, name) != getattr(defaults, name)]
        if self.split_val_fraction != 0.1:  # the data commands' default
            flags.append(f"--val-fraction {self.split_val_fraction}")
        return " ".join(flags + (["--allow-missing"] if self.allow_missing else []))

    def load_data(self, folder: str | os.PathLike) -> Any:
        """The dataset the demo runs on, read with these data options (any collection)."""
        from cxrembed.data import load_dataset

        options = dict(self.reader_options)
        return load_dataset(folder, options.pop("dataset", "auto"), csv_path=self.csv,
                            train_val_list=self.train_val_list, test_list=self.test_list,
                            view=self.view, val_fraction=self.split_val_fraction,
                            seed=self.split_seed,
                            missing="drop" if self.allow_missing else "error", **options)

    def adapt_overrides(self, device: str) -> dict[str, Any]:
        tiny = self.model == "cxr-tiny"
        # On a CPU the reading processes only compete with training for the same cores.
        workers = self.workers if self.workers is not None else (0 if device == "cpu" else 4)
        return {
            "model": self.model, "pretrained": self.pretrained, "epochs": self.epochs,
            "batch_size": self.batch_size, "workers": workers,
            "lr_encoder": self.lr_encoder if self.lr_encoder is not None else
            (1e-3 if tiny else 1e-5),
            "lr_head": self.lr_head if self.lr_head is not None else 1e-4,
            "unfreeze": self.unfreeze if self.unfreeze is not None else (4 if tiny else 3),
            "val_fraction": self.split_val_fraction,
        }


def check_config(config: DemoConfig) -> None:
    """ConfigError for values the demo cannot run with."""
    csv_file = (config.reader_options.get("dataset") == "csv" and config.data is not None
                and Path(config.data).is_file())
    if config.data is not None and not Path(config.data).is_dir() and not csv_file:
        raise ConfigError(f"--data {config.data} is not a folder; give a data folder (NIH, "
                          "CheXpert, MIMIC-CXR-JPG, PadChest, class folders; or a CSV with "
                          "--dataset csv), or leave --data out to use the synthetic twin")
    given = [f"--{name.replace('_', '-')}" for name in ("csv", "train_val_list", "test_list")
             if getattr(config, name) is not None]
    given += [f"--{name.replace('_', '-')}" for name in config.reader_options]
    if config.data is None and given:
        raise ConfigError(f"{', '.join(given)} describe a real data folder: pass it with "
                          "--data (the synthetic twin has its own files)")
    if config.epochs < 1 or config.seeds < 1:
        raise ConfigError("--epochs and --seeds must be at least 1")
