"""Reading class folders (ImageFolder style): one subfolder per class, no CSV.

::

    my-collection/                       or   my-collection/
      effusion/0001.png                         train/effusion/0001.png
      normal/0002.jpg                           train/normal/...
      pneumothorax/...                          val/...   test/...

Each image carries the one class of its folder. With ``train/`` (and ``val/`` or
``valid/``, ``test/``) at the top, those are the splits; a split not there is a seeded
share of train's images. The folders name no patients, so each image is its own patient
and the splits cannot be checked patient-disjoint (``info`` says so).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cxrembed.data.table import ImageTable, check_common_options, finish_table, seeded_splits
from cxrembed.errors import DataError

NAME = "folders"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}


def _images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted; suffix case ignored."""
    found = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(base) / f for f in sorted(files)
                     if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
    return found


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect(root: Path) -> bool:
    """Subfolders holding images and no CSV at the top."""
    try:
        if any(p.suffix.lower() in (".csv", ".gz") for p in root.iterdir() if p.is_file()):
            return False
        return any(_images(d)[:1] for d in _class_dirs(root))
    except OSError:
        return False


def load(root: str | os.PathLike, *, view: str = "all", val_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 7, missing: str = "error") -> ImageTable:
    """Read class folders into an :class:`ImageTable` (see the module docstring)."""
    root = Path(root)
    check_common_options(root, missing)
    tops = _class_dirs(root)
    by_split = {d.name.lower(): d for d in tops if d.name.lower() in SPLIT_FOLDERS}
    if by_split and "train" not in by_split:
        raise DataError(f"{root} has {', '.join(by_split)} folder(s) but no train/: put the "
                        "training images' class folders under train/")
    parts = ([(SPLIT_FOLDERS[name], d) for name, d in by_split.items()] if by_split
             else [("", root)])
    entries = []  # (split, class, path)
    for split, folder in parts:
        for class_dir in _class_dirs(folder):
            entries.extend((split, class_dir.name, p) for p in _images(class_dir))
    if not entries:
        raise DataError(f"no images (PNG/JPEG) in class folders under {root}; expected "
                        "CLASS/IMAGE.png, optionally under train/, val/ and test/")
    names = sorted({c for _, c, _ in entries})
    index = {c: k for k, c in enumerate(names)}
    n = len(entries)
    labels = np.zeros((n, len(names)), dtype=np.uint8)
    labels[np.arange(n), [index[c] for _, c, _ in entries]] = 1
    rel = [p.relative_to(root).as_posix() for _, _, p in entries]
    split = seeded_splits(np.array(rel), np.array([s for s, _, _ in entries], dtype="<U9"),
                          val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if view not in (None, "all"):
        raise DataError(f"--view {view}: class folders carry no view; use --view all")
    rows = {"image_id": np.array(rel, dtype=str), "patient": np.array(rel, dtype=str),
            "follow_up": np.zeros(n, np.int64), "labels": labels,
            "label_known": np.ones(labels.shape, dtype=bool), "view": np.full(n, "", "<U1"),
            "age": np.full(n, np.nan, np.float32), "sex": np.full(n, "", "<U1"),
            "split": split, "path": np.array([str(p) for _, _, p in entries], dtype=object)}
    notes = ["class folders name no patients: each image is its own patient, so the splits "
             "cannot be checked patient-disjoint"]
    return finish_table(root, rows, label_names=names, dataset=NAME, view=view,
                        missing=missing, sources={"layout": "split folders" if by_split
                                                  else "class folders", "seed": str(seed)},
                        where=f"the class folders of {root}", notes=notes)
