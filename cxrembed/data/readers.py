"""One entry point for every collection: ``load_dataset(root, dataset="auto", ...)``.

Each reader is a module of :mod:`cxrembed.data` with ``NAME``, ``detect(root) -> bool``
and ``load(root, **options) -> ImageTable``; this module picks one (by name, or by what
the folder holds) and passes it the options it takes. An option a reader does not take is
an error when it is set, so ``--label-cols`` on a CheXpert folder is not silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
import os
from importlib import import_module
from pathlib import Path
from typing import Any

from cxrembed.data.table import ImageTable
from cxrembed.errors import ConfigError, DataError

#: Reader name -> module, in the order auto-detection tries them.
READERS: dict[str, str] = {
    "nih": "cxrembed.data.nih",
    "mimic": "cxrembed.data.mimic",
    "chexpert": "cxrembed.data.chexpert",
    "padchest": "cxrembed.data.padchest",
    "csv": "cxrembed.data.csvfile",
    "folders": "cxrembed.data.folders",
}
DATASETS = ("auto", *READERS)
#: Library option name -> the CLI flag that sets it (for messages).
FLAGS = {"csv_path": "--csv", "train_val_list": "--train-val-list", "test_list": "--test-list",
         "image_col": "--image-col", "label_cols": "--label-cols", "label_col": "--label-col",
         "label_sep": "--label-sep", "patient_col": "--patient-col", "split_col": "--split-col",
         "view_col": "--view-col", "age_col": "--age-col", "sex_col": "--sex-col",
         "images": "--images", "uncertain": "--uncertain", "blank": "--blank",
         "test_fraction": "--test-fraction", "val_fraction": "--val-fraction",
         "seed": "--split-seed", "view": "--view", "missing": "--allow-missing"}
#: Values that mean "not set" for an option (so a reader without it does not object).
_DEFAULTS = {"view": ("all", None), "uncertain": ("ignore", None), "blank": ("negative", None),
             "label_sep": ("|", None), "val_fraction": (0.1, None),
             "test_fraction": (0.1, None), "seed": (7, None), "missing": ("error", None)}


def reader(name: str) -> Any:
    """The reader module of ``name``; an unknown name lists the choices and the closest."""
    if name not in READERS:
        close = difflib.get_close_matches(name, list(READERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown --dataset {name!r}{hint}; expected one of "
                          f"{', '.join(DATASETS)}")
    return import_module(READERS[name])


def detect(root: str | os.PathLike, options: dict[str, Any] | None = None) -> str:
    """The reader a folder's files call for (``csv`` when an image column is given)."""
    root = Path(root)
    if options and options.get("image_col"):
        return "csv"
    if root.is_file() and root.name.lower().endswith((".csv", ".csv.gz")):
        raise DataError(f"{root} is a CSV file: pass --dataset csv with --image-col and "
                        "--label-cols or --label-col to read it")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    for name in READERS:
        if name == "csv":
            continue
        if reader(name).detect(root):
            return name
    raise DataError(
        f"cannot tell what collection {root} holds: no NIH Data_Entry_2017*.csv, no CheXpert "
        "train.csv/valid.csv, no mimic-cxr-2.x.x-chexpert.csv(.gz), no PADCHEST_*.csv, and no "
        "class folders of images. Name it with --dataset (one of "
        f"{', '.join(READERS)}); for your own CSV use --dataset csv --image-col COL "
        "--label-cols A,B or --label-col COL --label-sep '|'")


def load_dataset(root: str | os.PathLike, dataset: str = "auto", *, follow_links: bool = False,
                 **options: Any) -> ImageTable:
    """Read any supported collection into an :class:`ImageTable`.

    Args:
        root: the data folder (or, for ``csv``, the CSV file).
        dataset: ``auto`` (detect from the folder) or one of :data:`READERS`.
        options: reader options (``view``, ``val_fraction``, ``test_fraction``, ``seed``,
            ``missing``, ``uncertain``, ``blank``, ``csv_path``, the csv reader's column
            names, ...). ``None`` means "not given".
        follow_links: follow symbolic links inside the data folder that lead out of it
            (``--follow-links``; refused otherwise: a metadata file must not make
            cxrembed read any file). Recorded on the table, and by encode in the store.
    """
    name = detect(root, options) if dataset == "auto" else dataset
    module = reader(name)
    accepted = inspect.signature(module.load).parameters
    given = {k: v for k, v in options.items() if v is not None}
    call: dict[str, Any] = {}
    for key, value in given.items():
        if key in accepted:
            call[key] = value
        elif value not in _DEFAULTS.get(key, (None,)) and value not in ((), [], False):
            raise ConfigError(f"{FLAGS.get(key, key)} does not apply to --dataset {name} "
                              f"({root}); leave it out")
    from cxrembed.data.tabular import FOLLOW_LINKS

    token = FOLLOW_LINKS.set(bool(follow_links))
    try:
        table = module.load(root, **call)
    finally:
        FOLLOW_LINKS.reset(token)
    table.follow_links = bool(follow_links)
    return table
