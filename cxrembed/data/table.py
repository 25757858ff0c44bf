"""The one table every reader yields, whatever the collection (NIH, CheXpert, MIMIC, ...).

The data contract, written down once. An :class:`ImageTable` holds one row per image,
row-aligned arrays, filtered as asked:

=============  ==========  ===========================================================
field          dtype       meaning
=============  ==========  ===========================================================
image_id       str         unique id of the image in its collection: NIH's file name,
                           MIMIC's ``dicom_id``, PadChest's ``ImageID``, else the path
                           relative to the data folder
patient_id     int64       the patient (the collection's own number where it has one,
                           else a code, 1-based, in first-seen order of ``patient``)
patient        str         the patient id as the collection writes it
follow_up      int64       study / follow-up number where known, else 0
labels         uint8 N×K   1 = positive, 0 = negative or unknown; K = ``len(label_names)``
label_known    bool N×K    False where the label is unknown (uncertain under
                           ``--uncertain ignore``): such cells are left out of losses
                           and AUCs, never counted as negative
view           str         upper case: ``PA``, ``AP``, ``LATERAL``, ... (``""`` unknown)
age            float32     years (NaN when unknown)
sex            str         ``M`` / ``F`` / ``""``
split          str         ``train`` / ``val`` / ``test``
path           str         image file on disk, ``""`` when it is not there
=============  ==========  ===========================================================

``label_names`` are the collection's own (NIH's 14, CheXpert's 13 observations, PadChest's
findings, a CSV's columns, the class folders); ``dataset`` names the reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrembed.data.splits import SPLITS, check_patient_disjoint, split_train_val_by_patient
from cxrembed.data.tabular import present_inside
from cxrembed.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "drop", "keep")
#: View filters that name a group of views rather than one view value.
VIEW_GROUPS = ("all", "frontal", "lateral")
_LATERAL = ("LATERAL", "LL", "RL", "L")


@dataclass
class ImageTable:
    """Row-aligned arrays for every image of a collection (see the module docstring)."""

    root: Path
    image_id: np.ndarray
    patient_id: np.ndarray
    follow_up: np.ndarray
    labels: np.ndarray
    view: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    split: np.ndarray
    path: np.ndarray
    #: Images named by the metadata but absent from disk (before any ``drop``).
    missing: list[str] = field(default_factory=list)
    #: Where each input came from, for summaries and for refusing mismatched use later.
    sources: dict[str, str] = field(default_factory=dict)
    label_names: tuple[str, ...] | None = None
    label_known: np.ndarray | None = None
    patient: np.ndarray | None = None
    dataset: str = "nih"
    #: A sentence for ``info`` when the collection lacks something (e.g. patient ids).
    notes: list[str] = field(default_factory=list)
    #: Read with ``--follow-links``: image paths may go through links leading out of root.
    follow_links: bool = False

    _ROW_FIELDS = ("image_id", "patient_id", "follow_up", "labels", "view", "age", "sex",
                   "split", "path", "label_known", "patient")

    def __post_init__(self) -> None:
        if self.label_names is None:
            from cxrembed.labels import LABELS

            self.label_names = LABELS
        self.label_names = tuple(self.label_names)
        if self.label_known is None:
            self.label_known = np.ones(self.labels.shape, dtype=bool)
        if self.patient is None:
            self.patient = np.asarray(self.patient_id).astype(str)
        if self.labels.shape != (len(self.image_id), len(self.label_names)):
            raise DataError(f"label matrix {self.labels.shape} does not match "
                            f"{len(self.image_id)} images x {len(self.label_names)} labels")

    def __len__(self) -> int:
        return len(self.image_id)

    def subset(self, rows: np.ndarray) -> "ImageTable":
        """A table of the selected rows (boolean mask or integer indices), same order."""
        kwargs = {name: getattr(self, name)[rows] for name in self._ROW_FIELDS}
        return ImageTable(root=self.root, missing=list(self.missing), sources=dict(self.sources),
                          label_names=self.label_names, dataset=self.dataset,
                          notes=list(self.notes), follow_links=self.follow_links, **kwargs)

    def split_rows(self, split: str) -> np.ndarray:
        """Integer row indices of one split (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == split)

    @property
    def present(self) -> np.ndarray:
        """Boolean mask of rows whose image file is on disk."""
        return self.path != ""

    def summary(self) -> dict:
        """Counts a person checks first: images, patients, per-class positives per split,
        of every row (the metadata's) and, under ``on_disk``, of the rows whose image is
        on disk (they differ on a partial download loaded with ``missing='keep'``)."""
        views, counts = np.unique(self.view, return_counts=True)
        out: dict = {
            "dataset": self.dataset,
            "root": str(self.root),
            "images": int(len(self)),
            "images_present": int(self.present.sum()),
            "images_missing": len(self.missing),
            "missing_examples": self.missing[:5],
            "patients": int(len(np.unique(self.patient_id))),
            "views": {str(v or "unknown"): int(c) for v, c in zip(views, counts)},
            "label_names": list(self.label_names),
            "notes": list(self.notes),
            "sources": dict(self.sources),
            "splits": {},
        }
        for split in SPLITS:
            rows = self.split == split
            out["splits"][split] = self._counts(rows)
            out["splits"][split]["on_disk"] = self._counts(rows & self.present)
        return out

    def _counts(self, rows: np.ndarray) -> dict:
        known = self.label_known[rows]
        return {
            "images": int(rows.sum()),
            "patients": int(len(np.unique(self.patient_id[rows]))),
            "no_finding": int(((self.labels[rows] * known).sum(axis=1) == 0).sum()),
            "positives": {name: int((self.labels[rows, i] & known[:, i]).sum())
                          for i, name in enumerate(self.label_names)},
            "unknown": {name: int((~known[:, i]).sum())
                        for i, name in enumerate(self.label_names)},
        }


# ---------------------------------------------------------------------------------------
# Pieces every reader shares


def check_common_options(root: Path, missing: str) -> None:
    """A data folder that exists and a known missing-image policy."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if missing not in MISSING_POLICIES:
        raise DataError(f"unknown missing-image policy {missing!r}; "
                        f"expected one of {', '.join(MISSING_POLICIES)}")


def view_mask(views: np.ndarray, view: str | None) -> np.ndarray:
    """Rows whose view passes ``view``: ``all``, ``frontal`` (PA/AP and their variants),
    ``lateral``, or a comma-separated list of view values (``PA,AP``). A view value that no
    image has is an error listing the views there are."""
    views = np.asarray(views)
    wanted = (view or "all").strip()
    if wanted.lower() == "all":
        return np.ones(len(views), dtype=bool)
    if wanted.lower() == "frontal":
        text = views.astype(str)
        return (np.char.startswith(text, "PA") | np.char.startswith(text, "AP")
                | (text == "FRONTAL"))
    if wanted.lower() == "lateral":
        return np.isin(views, _LATERAL)
    names = [v.strip().upper() for v in wanted.split(",") if v.strip()]
    present = sorted(set(views.tolist()) - {""})
    unknown = [v for v in names if v not in present]
    if unknown or not names:
        raise DataError(f"unknown view {', '.join(unknown) or wanted!r}: this collection has "
                        f"{', '.join(present) or 'no view values'}; give one or more of them "
                        f"(comma-separated) or one of {', '.join(VIEW_GROUPS)}")
    return np.isin(views, names)


def check_unique_images(image_id: np.ndarray, where: str) -> None:
    """Two rows of one image would land in two splits or count twice: refuse them."""
    uniq, counts = np.unique(image_id, return_counts=True)
    if (counts > 1).any():
        twice = uniq[counts > 1]
        raise DataError(f"{where} lists {len(twice)} image(s) more than once (first: "
                        f"{', '.join(map(str, twice[:3]))}); keep one row per image")


def patient_codes(patient: np.ndarray) -> np.ndarray:
    """int64 patient numbers: the ids themselves when every one is an integer that fits,
    else codes 1.. in first-seen order."""
    patient = np.asarray(patient).astype(str)
    try:
        numbers = np.array([int(p) for p in patient], dtype=np.int64)
        if len(numbers) == 0 or (numbers >= 0).all():
            return numbers
    except (ValueError, OverflowError):
        pass
    _, first, inverse = np.unique(patient, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(first) + 1)
    return rank[inverse.reshape(-1)]


def seeded_splits(patient_id: np.ndarray, split: np.ndarray, *, val_fraction: float,
                  test_fraction: float, seed: int) -> np.ndarray:
    """Fill the splits a collection does not ship, by patient, seeded.

    Rows whose split is ``""`` or ``train_val`` are the pool. When no row is ``test``, a
    seeded ``test_fraction`` of the pool's patients becomes test; when no row is ``val``, a
    seeded ``val_fraction`` of the rest becomes val; what is left is train.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be in [0, 1)")
    split = np.asarray(split).astype("<U9").copy()
    pool = (split == "") | (split == "train_val")
    if not (split == "test").any() and test_fraction > 0:
        is_test = split_train_val_by_patient(patient_id, pool, val_fraction=test_fraction,
                                             seed=seed + 1)
        split[is_test] = "test"
        pool &= ~is_test
    if not (split == "val").any():
        is_val = split_train_val_by_patient(patient_id, pool, val_fraction=val_fraction,
                                            seed=seed)
        split[is_val] = "val"
        pool &= ~is_val
    split[pool] = "train"
    return split.astype("<U5")


def finish_table(root: Path, rows: dict[str, np.ndarray], *, label_names: list[str],
                 dataset: str, view: str | None, missing: str, sources: dict[str, str],
                 where: str, notes: list[str] | None = None) -> ImageTable:
    """Filter by view, check splits and images, apply the missing-image policy.

    ``rows`` holds every row field of :class:`ImageTable` but ``patient_id`` (made from
    ``patient``); ``path`` is the expected image file, checked here.
    """
    check_unique_images(rows["image_id"], where)
    keep = view_mask(rows["view"], view)
    patient_id = patient_codes(rows["patient"])
    for i, first in enumerate(SPLITS):  # as assert_patient_disjoint, naming the images
        for second in SPLITS[i + 1:]:
            check_patient_disjoint(patient_id, keep & (rows["split"] == first),
                                   keep & (rows["split"] == second), rows["image_id"],
                                   f"{first} and {second} ({where})")
    paths = present_inside(root, rows["path"], where)
    absent = keep & (paths == "")
    missing_names = [str(n) for n in rows["image_id"][absent]]
    if missing_names and missing == "error":
        if len(missing_names) == keep.sum():
            raise DataError(f"none of the {keep.sum()} images named by {where} is under {root} "
                            f"(first expected at {rows['path'][absent][0]}); is this the right "
                            "data folder?")
        raise DataError(f"{len(missing_names)} of {keep.sum()} images named by {where} are not "
                        f"under {root} (first: {', '.join(missing_names[:5])}); to continue "
                        "with the images that are present, pass --allow-missing (in Python: "
                        "missing='drop')")
    if missing == "drop":
        keep &= paths != ""
    table = ImageTable(root=root, patient_id=patient_id, label_names=tuple(label_names),
                       dataset=dataset, missing=missing_names, sources=dict(sources),
                       notes=list(notes or []),
                       **{**rows, "path": paths.astype(str)}).subset(np.flatnonzero(keep))
    log.info("loaded %d images of %d patients from %s (%s)", len(table),
             len(np.unique(table.patient_id)), root, dataset)
    return table
