"""Reading MIMIC-CXR-JPG 2.x: the CheXpert-labeller CSV, the metadata, the official split.

Layout (as PhysioNet serves ``mimic-cxr-jpg/2.0.0`` or ``2.1.0``)::

    mimic-cxr-jpg/                           the data folder
      mimic-cxr-2.0.0-chexpert.csv.gz        subject_id, study_id, 14 observations
      mimic-cxr-2.0.0-metadata.csv.gz        dicom_id, subject_id, study_id, ViewPosition, ...
      mimic-cxr-2.0.0-split.csv.gz           dicom_id, study_id, subject_id, split
      files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg

(plain ``.csv`` works too). One row per image of the metadata; labels are per study, with
CheXpert's conventions (1, 0, -1 uncertain, blank not mentioned; see
:mod:`cxrembed.data.chexpert`); a study the labeller skipped has every label unknown.
Splits are the official ones (``validate`` is val); without the split file they are
seeded by patient. MIMIC-CXR-JPG has no age or sex (they are in MIMIC-IV).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cxrembed.data.chexpert import LABELS
from cxrembed.data.table import ImageTable, check_common_options, finish_table, seeded_splits
from cxrembed.data.tabular import label_columns, parse_split, read_csv
from cxrembed.errors import DataError

NAME = "mimic"
_FILE = re.compile(r"^mimic-cxr-(2\.\d+\.\d+)-(chexpert|metadata|split)\.csv(\.gz)?$")


def find_files(root: Path) -> dict[str, Path]:
    """The newest release's ``chexpert``, ``metadata`` and ``split`` files in ``root``."""
    found: dict[str, tuple[str, Path]] = {}
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise DataError(f"cannot list data folder {root}: {exc}") from exc
    for name in sorted(names):
        match = _FILE.match(name)
        if match and (match.group(2) not in found or match.group(1) >= found[match.group(2)][0]):
            found[match.group(2)] = (match.group(1), root / name)
    return {kind: path for kind, (_, path) in found.items()}


def detect(root: Path) -> bool:
    """A folder with ``mimic-cxr-2.x.x-chexpert.csv(.gz)`` or ``-metadata.csv(.gz)``."""
    files = find_files(root)
    return "chexpert" in files or "metadata" in files


def image_path(subject: str, study: str, dicom: str) -> str:
    """``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg`` (NN: the subject id's first two digits)."""
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def load(root: str | os.PathLike, *, view: str = "all", val_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 7, missing: str = "error",
         uncertain: str = "ignore", blank: str = "negative") -> ImageTable:
    """Read a MIMIC-CXR-JPG folder into an :class:`ImageTable` (see the module docstring)."""
    root = Path(root)
    check_common_options(root, missing)
    files = find_files(root)
    for kind in ("chexpert", "metadata"):
        if kind not in files:
            raise DataError(f"no mimic-cxr-2.x.x-{kind}.csv(.gz) in {root}; the MIMIC-CXR-JPG "
                            "release has it at its top level, beside files/")
    meta = read_csv(files["metadata"])
    meta.require(("dicom_id", "subject_id", "study_id", "ViewPosition"),
                 "a MIMIC-CXR-JPG metadata file")
    labels_csv = read_csv(files["chexpert"])
    labels_csv.require(("subject_id", "study_id") + LABELS, "a MIMIC-CXR-JPG chexpert file")
    study_labels, study_known = label_columns(labels_csv, list(LABELS), uncertain=uncertain,
                                              blank=blank, ids=labels_csv.column("study_id"))
    row_of_study = {s.strip(): r for r, s in enumerate(labels_csv.column("study_id"))}

    dicom = [d.strip() for d in meta.column("dicom_id")]
    subject = [s.strip() for s in meta.column("subject_id")]
    study = [s.strip() for s in meta.column("study_id")]
    n = len(dicom)
    labels = np.zeros((n, len(LABELS)), dtype=np.uint8)
    known = np.zeros((n, len(LABELS)), dtype=bool)
    unlabelled = 0
    for r, s in enumerate(study):
        source = row_of_study.get(s)
        if source is None:
            unlabelled += 1
            continue
        labels[r], known[r] = study_labels[source], study_known[source]

    split = np.full(n, "", dtype="<U9")
    if "split" in files:
        split_csv = read_csv(files["split"])
        split_csv.require(("dicom_id", "split"), "a MIMIC-CXR-JPG split file")
        official = {d.strip(): parse_split(v, f"{split_csv.path}, row {r + 2}")
                    for r, (d, v) in enumerate(zip(split_csv.column("dicom_id"),
                                                   split_csv.column("split")))}
        split[:] = [official.get(d, "") for d in dicom]
    split = seeded_splits(np.array(subject), split, val_fraction=val_fraction,
                          test_fraction=0.0 if "split" in files else test_fraction, seed=seed)
    views = [v.strip().upper() for v in meta.column("ViewPosition")]
    paths = [os.path.join(root, image_path(su, st, d)) for su, st, d in zip(subject, study, dicom)]
    rows = {"image_id": np.array(dicom, dtype=str), "patient": np.array(subject, dtype=str),
            "follow_up": np.array([int(s) if s.isdigit() else 0 for s in study], np.int64),
            "labels": labels, "label_known": known, "view": np.array(views, dtype=str),
            "age": np.full(n, np.nan, np.float32), "sex": np.full(n, "", dtype="<U1"),
            "split": split, "path": np.array(paths, dtype=object)}
    notes = ["MIMIC-CXR-JPG has no age or sex (they are in MIMIC-IV's patients table)"]
    if unlabelled:
        notes.append(f"{unlabelled} images belong to studies absent from "
                     f"{files['chexpert'].name}: all their labels are unknown")
    if "split" not in files:
        notes.append("no split file: splits are seeded by patient")
    sources = {kind: str(path) for kind, path in files.items()}
    sources.update({"uncertain": uncertain, "blank": blank, "view": view, "seed": str(seed)})
    return finish_table(root, rows, label_names=list(LABELS), dataset=NAME, view=view,
                        missing=missing, sources=sources, where=files["metadata"].name,
                        notes=notes)
