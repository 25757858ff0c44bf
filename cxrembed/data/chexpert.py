"""Reading CheXpert v1.0 (full or ``-small``): ``train.csv``, ``valid.csv``, JPEGs.

Layout (as the Stanford download unpacks)::

    CheXpert-v1.0-small/                 the data folder
      train.csv   valid.csv              Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations
      test.csv or test_labels.csv        optional: the test set, when you have it
      train/patient00001/study1/view1_frontal.jpg
      valid/patient64541/study1/view1_frontal.jpg

``Path`` cells start with the release folder (``CheXpert-v1.0-small/train/...``); that
first part is dropped and the rest is read under the data folder, whatever the folder is
called. Label cells are 1, 0, -1 (uncertain) or blank (not mentioned: negative by default,
``blank="unknown"`` masks it); ``uncertain`` picks U-Ignore (default: masked out of loss
and AUC), U-Ones or U-Zeros. ``No Finding`` is the absence of every finding (as NIH's), so
the 13 other observations are the classes. The official valid set is val; test is the test
CSV when present, else a seeded, patient-disjoint ``test_fraction`` of train's patients.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cxrembed.data.table import ImageTable, check_common_options, finish_table, seeded_splits
from cxrembed.data.tabular import (CsvTable, find_file, label_columns, parse_age, parse_sex,
                                   read_csv, resolve_image)
from cxrembed.errors import DataError

NAME = "chexpert"
#: The 14 observation columns of the CheXpert CSVs, in their order.
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                "Support Devices")
LABELS = OBSERVATIONS[1:]
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
TEST_CSVS = ("test.csv", "test_labels.csv")
_PATIENT = re.compile(r"patient(\d+)")
_STUDY = re.compile(r"study(\d+)")
_SPLIT_DIRS = ("train", "valid", "test")


def detect(root: Path) -> bool:
    """A folder with CheXpert's train.csv or valid.csv (a ``Path`` and ``Frontal/Lateral``
    header)."""
    for name in (TRAIN_CSV, VALID_CSV):
        path = root / name
        if path.is_file():
            with open(path, encoding="utf-8-sig", errors="replace") as f:
                header = f.readline()
            if header.startswith("Path") and "Frontal/Lateral" in header:
                return True
    return False


def relative_path(cell: str) -> str:
    """``CheXpert-v1.0-small/train/p/s/v.jpg`` -> ``train/p/s/v.jpg`` (any release name)."""
    parts = cell.strip().replace("\\", "/").split("/")
    if len(parts) > 1 and parts[0] not in _SPLIT_DIRS and parts[0] not in ("", ".", ".."):
        parts = parts[1:]
    return "/".join(parts)


def _rows(root: Path, table: CsvTable, split: str, uncertain: str, blank: str) -> dict:
    table.require(("Path",) + LABELS, "a CheXpert CSV")
    rel = [relative_path(p) for p in table.column("Path")]
    where = [f"{table.path}, row {r + 2}" for r in range(len(rel))]
    paths = [resolve_image(root, p, w) for p, w in zip(rel, where)]
    labels, known = label_columns(table, list(LABELS), uncertain=uncertain, blank=blank,
                                  ids=rel)
    patient, follow_up = [], []
    for p, w in zip(rel, where):
        found = _PATIENT.search(p)
        if found is None:
            raise DataError(f"{w}: Path {p!r} names no patientNNNNN folder; CheXpert paths "
                            "look like train/patient00001/study1/view1_frontal.jpg")
        patient.append(str(int(found.group(1))))
        study = _STUDY.search(p)
        follow_up.append(int(study.group(1)) if study else 0)
    n = len(rel)
    cells = table.columns
    frontal = cells.get("Frontal/Lateral", [""] * n)
    appa = cells.get("AP/PA", [""] * n)
    view = ["LATERAL" if f.strip().lower() == "lateral" else
            (a.strip().upper() or ("FRONTAL" if f.strip() else "")) for f, a in zip(frontal, appa)]
    return {"image_id": np.array(rel, dtype=str), "patient": np.array(patient, dtype=str),
            "follow_up": np.array(follow_up, dtype=np.int64), "labels": labels,
            "label_known": known, "view": np.array(view, dtype=str),
            "age": np.array([parse_age(a) for a in cells.get("Age", [""] * n)], np.float32),
            "sex": np.array([parse_sex(s) for s in cells.get("Sex", [""] * n)], dtype=str),
            "split": np.full(n, split, dtype="<U9"), "path": np.array(paths, dtype=object)}


def load(root: str | os.PathLike, *, view: str = "all", val_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 7, missing: str = "error",
         uncertain: str = "ignore", blank: str = "negative") -> ImageTable:
    """Read a CheXpert folder into an :class:`ImageTable` (see the module docstring).

    ``val_fraction`` is unused (the official valid set is val); it is accepted so that
    every reader takes the same split options.
    """
    root = Path(root)
    check_common_options(root, missing)
    train_path, valid_path = root / TRAIN_CSV, root / VALID_CSV
    if not train_path.is_file() and not valid_path.is_file():
        raise DataError(f"no {TRAIN_CSV} or {VALID_CSV} in {root}; a CheXpert folder "
                        "(CheXpert-v1.0 or CheXpert-v1.0-small) has both at its top level")
    parts, sources = [], {}
    test_path = find_file(root, TEST_CSVS)
    for path, split in ((train_path, ""), (valid_path, "val"), (test_path, "test")):
        if path is not None and path.is_file():
            parts.append(_rows(root, read_csv(path), split, uncertain, blank))
            sources[split or "train"] = str(path)
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    rows["split"] = seeded_splits(rows["patient"], rows["split"], val_fraction=val_fraction,
                                  test_fraction=0.0 if test_path else test_fraction, seed=seed)
    notes = [] if test_path else [
        f"test is a seeded {test_fraction:.0%} of train's patients (no CheXpert test CSV "
        f"{' / '.join(TEST_CSVS)} in the folder)"]
    sources.update({"uncertain": uncertain, "blank": blank, "view": view, "seed": str(seed),
                    "test_fraction": str(test_fraction)})
    return finish_table(root, rows, label_names=list(LABELS), dataset=NAME, view=view,
                        missing=missing, sources=sources, where="the CheXpert CSVs",
                        notes=notes)
