"""Reading PadChest: one CSV of reports' labels and 16-bit PNGs in numbered folders.

Layout (as the BIMCV download unpacks: one folder per zip, ``0`` to ``54``)::

    padchest/                                                  the data folder
      PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)
      0/216840111366964012283393834152009033102258826_00-059-087.png
      1/...                                                    (or images/, or flat)

Columns read: ``ImageID``, ``ImageDir``, ``PatientID``, ``Projection``, ``Labels`` (a
Python-list string such as ``"['pneumonia', 'pleural effusion']"``, parsed with
:func:`ast.literal_eval`, never ``eval``) and, when present, ``PatientBirth``,
``StudyDate_DICOM`` (age = study year - birth year) and ``PatientSex_DICOM``. The classes
are every finding the file names (lower case, stripped); ``normal`` is the absence of all
findings, ``exclude`` and ``suboptimal study`` are quality flags, not findings. Rows
without labels are left out (counted in ``info``). PadChest ships no split: splits are
seeded by patient.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np

from cxrembed.data.table import ImageTable, check_common_options, finish_table, seeded_splits
from cxrembed.data.tabular import CsvTable, parse_age, parse_sex, read_csv, resolve_image
from cxrembed.errors import DataError

NAME = "padchest"
CSV_PREFIX = "PADCHEST_chest_x_ray_images_labels"
REQUIRED = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")
NOT_FINDINGS = ("normal", "exclude", "suboptimal study", "")
PROJECTIONS = {"L": "LATERAL"}


def find_csv(root: Path) -> Path | None:
    """The PadChest label CSV in ``root`` (``PADCHEST_chest_x_ray_images_labels*.csv[.gz]``)."""
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith(CSV_PREFIX)
                       and (n.endswith(".csv") or n.endswith(".csv.gz")))
    except OSError:
        return None
    return root / names[-1] if names else None


def detect(root: Path) -> bool:
    return find_csv(root) is not None


def parse_labels(cell: str, where: str) -> list[str] | None:
    """Findings of a ``Labels`` cell; None when the cell is blank (an unlabelled image)."""
    text = cell.strip()
    if not text or text.lower() == "nan":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{where}, column 'Labels': {cell[:80]!r} is not a Python list of "
                        "strings such as \"['pneumonia', 'pleural effusion']\"") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}, column 'Labels': {cell[:80]!r} is not a list of strings")
    return [v.strip().lower() for v in value]


def _image_path(root: Path, image_dir: str, image_id: str, where: str) -> str:
    folder = image_dir.strip()
    if folder.endswith(".0"):  # pandas-written copies have "12.0"
        folder = folder[:-2]
    candidates = [f"{folder}/{image_id}", f"images/{image_id}", image_id]
    paths = [resolve_image(root, c, where) for c in candidates if c and not c.startswith("/")]
    return next((p for p in paths if os.path.isfile(p)), paths[0])


def _age(birth: str, study_date: str) -> float:
    year = parse_age(birth)
    date = study_date.strip()
    if np.isnan(year) or len(date) < 4 or not date[:4].isdigit():
        return float("nan")
    return float(int(date[:4]) - year)


def _rows(root: Path, table: CsvTable) -> tuple[dict, list[str], int]:
    table.require(REQUIRED, "the PadChest CSV")
    n_all = len(table)
    findings, keep = [], []
    for r, cell in enumerate(table.column("Labels")):
        parsed = parse_labels(cell, f"{table.path}, row {r + 2}")
        if parsed is not None:
            keep.append(r)
            findings.append([f for f in parsed if f not in NOT_FINDINGS])
    names = sorted({f for row in findings for f in row})
    index = {name: k for k, name in enumerate(names)}
    labels = np.zeros((len(keep), len(names)), dtype=np.uint8)
    for i, row in enumerate(findings):
        labels[i, [index[f] for f in row]] = 1
    cells = {c: [table.columns[c][r] for r in keep] for c in table.header}
    n = len(keep)
    ids = [i.strip() for i in cells["ImageID"]]
    paths = [_image_path(root, d, i, f"{table.path}, row {r + 2}")
             for d, i, r in zip(cells["ImageDir"], ids, keep)]
    views = [PROJECTIONS.get(p.strip(), p.strip().upper()) for p in cells["Projection"]]
    age = [_age(b, d) for b, d in zip(cells.get("PatientBirth", [""] * n),
                                      cells.get("StudyDate_DICOM", [""] * n))]
    rows = {"image_id": np.array(ids, dtype=str),
            "patient": np.array([p.strip() for p in cells["PatientID"]], dtype=str),
            "follow_up": np.zeros(n, np.int64), "labels": labels,
            "label_known": np.ones(labels.shape, dtype=bool), "view": np.array(views, dtype=str),
            "age": np.array(age, np.float32),
            "sex": np.array([parse_sex(s) for s in cells.get("PatientSex_DICOM", [""] * n)],
                            dtype=str),
            "split": np.full(n, "", dtype="<U9"), "path": np.array(paths, dtype=object)}
    return rows, names, n_all - n


def load(root: str | os.PathLike, *, view: str = "all", val_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 7, missing: str = "error",
         csv_path: str | os.PathLike | None = None) -> ImageTable:
    """Read a PadChest folder into an :class:`ImageTable` (see the module docstring)."""
    root = Path(root)
    check_common_options(root, missing)
    path = Path(csv_path) if csv_path else find_csv(root)
    if path is None:
        raise DataError(f"no {CSV_PREFIX}*.csv(.gz) in {root}; the PadChest download has it at "
                        "its top level (or point at a copy with --csv PATH)")
    rows, names, unlabelled = _rows(root, read_csv(path))
    if not len(rows["image_id"]):
        raise DataError(f"{path} has no row with labels")
    rows["split"] = seeded_splits(rows["patient"], rows["split"], val_fraction=val_fraction,
                                  test_fraction=test_fraction, seed=seed)
    notes = [f"PadChest ships no split: val and test are seeded shares of patients "
             f"({val_fraction:.0%} / {test_fraction:.0%})"]
    if unlabelled:
        notes.append(f"{unlabelled} rows of {path.name} have no labels and are left out")
    sources = {"metadata": str(path), "view": view, "seed": str(seed),
               "val_fraction": str(val_fraction), "test_fraction": str(test_fraction)}
    return finish_table(root, rows, label_names=names, dataset=NAME, view=view,
                        missing=missing, sources=sources, where=path.name, notes=notes)
