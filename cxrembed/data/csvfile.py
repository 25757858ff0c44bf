"""Reading any labelled CSV: a hospital export, a Kaggle set, a collection not known here.

::

    my-collection/                 the data folder (or the folder given by --images)
      labels.csv                   image,patient,split,view,Effusion,Mass   (any names)
      scans/0001.png  scans/0002.JPG  ...   (PNG 8/16-bit, JPEG; L, RGB or RGBA)

Columns are named by the caller: ``image_col`` (a path relative to the CSV's folder, or to
``images`` when given), then either ``label_cols`` (one 1 / 0 / -1 / blank column per
class; -1 follows ``uncertain``) or ``label_col`` with ``label_sep`` (a text column such
as ``Effusion|Mass`` or ``Pneumonia/Viral/COVID-19``; ``No Finding`` and blank mean none),
and optionally ``patient_col`` (else each image is its own patient), ``split_col``
(train / val / valid / validation / test; blank or absent: seeded by patient),
``view_col`` with ``view`` (e.g. ``PA,AP``), ``age_col`` and ``sex_col``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cxrembed.data.table import ImageTable, check_common_options, finish_table, seeded_splits
from cxrembed.data.tabular import (CsvTable, label_columns, parse_age, parse_sex, parse_split,
                                   read_csv, resolve_image)
from cxrembed.errors import ConfigError, DataError

NAME = "csv"
NO_FINDING = ("no finding", "")


def find_csv(root: Path) -> Path:
    """The one CSV in ``root`` (an error lists them when there are several or none)."""
    found = sorted(p for p in root.iterdir() if p.is_file()
                   and (p.name.lower().endswith(".csv") or p.name.lower().endswith(".csv.gz")))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{root} holds {len(found)} CSV files ({listed}); name the one to read "
                        "with --csv PATH")
    return found[0]


def text_labels(table: CsvTable, column: str, sep: str) -> tuple[np.ndarray, list[str]]:
    """Multi-hot labels of a text column split on ``sep``; classes in first-seen order."""
    if not sep:
        raise ConfigError("--label-sep must not be empty (e.g. '|' or '/')")
    rows = [[t.strip() for t in cell.split(sep)] for cell in table.column(column, "--label-col")]
    rows = [[t for t in r if t.lower() not in NO_FINDING] for r in rows]
    names = list(dict.fromkeys(t for r in rows for t in r))
    index = {name: k for k, name in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), dtype=np.uint8)
    for i, r in enumerate(rows):
        labels[i, [index[t] for t in r]] = 1
    return labels, names


def load(root: str | os.PathLike, *, image_col: str | None = None,
         label_cols: list[str] | str | None = None, label_col: str | None = None,
         label_sep: str = "|", patient_col: str | None = None, split_col: str | None = None,
         view_col: str | None = None, age_col: str | None = None, sex_col: str | None = None,
         csv_path: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
         view: str = "all", val_fraction: float = 0.1, test_fraction: float = 0.1,
         seed: int = 7, missing: str = "error", uncertain: str = "ignore",
         blank: str = "negative") -> ImageTable:
    """Read a labelled CSV into an :class:`ImageTable` (see the module docstring).

    ``root`` is the CSV itself or its folder (with ``csv_path`` naming the file when the
    folder holds several).
    """
    root = Path(root)
    if root.is_file() and csv_path is None:
        root, csv_path = root.parent, root
    check_common_options(root, missing)
    path = Path(csv_path) if csv_path else find_csv(root)
    if not image_col:
        raise ConfigError("--dataset csv needs --image-col COLUMN (the image path column)")
    if bool(label_cols) == bool(label_col):
        raise ConfigError("--dataset csv needs either --label-cols A,B,C (0/1/-1/blank "
                          "columns) or --label-col COLUMN with --label-sep SEP, not both")
    base = Path(images) if images else path.parent
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist or is not a folder")
    table = read_csv(path)
    rel = [c.strip() for c in table.column(image_col, "--image-col")]
    where = [f"{path}, row {r + 2}" for r in range(len(rel))]
    paths = [resolve_image(base, p, w) for p, w in zip(rel, where)]
    if label_cols:
        names = ([c.strip() for c in label_cols.split(",")] if isinstance(label_cols, str)
                 else list(label_cols))
        for name in names:
            table.column(name, "--label-cols")
        labels, known = label_columns(table, names, uncertain=uncertain, blank=blank, ids=rel)
    else:
        labels, names = text_labels(table, label_col, label_sep)
        known = np.ones(labels.shape, dtype=bool)
    n = len(rel)
    notes = []
    if patient_col:
        patient = [p.strip() for p in table.column(patient_col, "--patient-col")]
    else:
        patient = rel
        notes.append("no --patient-col: each image is its own patient, so splits cannot be "
                     "checked patient-disjoint")
    split = np.full(n, "", dtype="<U9")
    if split_col:
        split[:] = [parse_split(c, w) for c, w in zip(table.column(split_col, "--split-col"),
                                                      where)]
    split = seeded_splits(np.array(patient), split, val_fraction=val_fraction,
                          test_fraction=test_fraction, seed=seed)

    def optional(column: str | None, option: str) -> list[str]:
        return table.column(column, option) if column else [""] * n

    rows = {"image_id": np.array(rel, dtype=str), "patient": np.array(patient, dtype=str),
            "follow_up": np.zeros(n, np.int64), "labels": labels, "label_known": known,
            "view": np.array([v.strip().upper() for v in optional(view_col, "--view-col")],
                             dtype=str),
            "age": np.array([parse_age(a) for a in optional(age_col, "--age-col")], np.float32),
            "sex": np.array([parse_sex(s) for s in optional(sex_col, "--sex-col")], dtype=str),
            "split": split, "path": np.array(paths, dtype=object)}
    if view not in (None, "all") and not view_col:
        raise ConfigError(f"--view {view} needs --view-col COLUMN to know each image's view")
    sources = {"metadata": str(path), "images": str(base), "view": view, "seed": str(seed),
               "uncertain": uncertain, "blank": blank}
    return finish_table(base, rows, label_names=names, dataset=NAME, view=view,
                        missing=missing, sources=sources, where=path.name, notes=notes)
