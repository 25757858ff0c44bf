"""Reading an NIH ChestX-ray14 release: metadata, official lists, images on disk.

The reader yields an :class:`~cxrembed.data.table.ImageTable` (``NIHDataset`` is its old
name), one row per image in the metadata file's order (the official CSV is sorted by image
name), filtered as asked; NIH's fields:

=============  ==========  ====================================================
field          dtype       meaning
=============  ==========  ====================================================
image_id       str         file name, ``00000001_000.png``
patient_id     int64       ``Patient ID``
follow_up      int64       ``Follow-up #``
labels         uint8 N×14  multi-hot, columns in :data:`cxrembed.labels.LABELS`
view           str         ``PA`` or ``AP``
age            float32     years (NaN when the cell is empty or unreadable)
sex            str         ``M`` / ``F``
split          str         ``train`` / ``val`` / ``test``
path           str         image file on disk, ``""`` when it is not there
=============  ==========  ====================================================
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
from pathlib import Path

import numpy as np

from cxrembed.errors import DataError
from cxrembed.labels import LABELS, parse_finding_labels
from cxrembed.data.splits import split_train_val_by_patient, check_patient_disjoint
from cxrembed.data.table import MISSING_POLICIES, ImageTable
from cxrembed.data.tabular import open_text, parse_age, present_inside

log = logging.getLogger(__name__)

NAME = "nih"
NIH_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
METADATA_NAMES = (
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
)
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
#: Columns cxrembed reads; the official file has these plus image size and pixel spacing.
REQUIRED_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
VIEWS = ("all", "PA", "AP")
IMAGE_SUFFIXES = (".png",)


#: The NIH reader yields the one table every reader yields.
NIHDataset = ImageTable


# ---------------------------------------------------------------------------------------
# Files


def find_metadata(root: Path, csv_path: Path | None = None) -> Path:
    """The metadata CSV: ``csv_path`` when given, else the first official name in ``root``."""
    if csv_path is not None:
        if not Path(csv_path).is_file():
            raise DataError(f"metadata file {csv_path} does not exist")
        return Path(csv_path)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"no metadata file in {root}: expected one of {', '.join(METADATA_NAMES)}. "
        f"The NIH release ({NIH_URL}) has Data_Entry_2017_v2020.csv at its top level; "
        "download it into the data folder or point at a copy with --csv PATH."
    )


def find_list(root: Path, name: str, given: Path | None, option: str) -> Path:
    """An official split list: ``given`` when set, else ``root/name``."""
    if given is not None:
        if not Path(given).is_file():
            raise DataError(f"split list {given} does not exist")
        return Path(given)
    if (root / name).is_file():
        return root / name
    raise DataError(
        f"no {name} in {root}. The NIH release ({NIH_URL}) has {name} at its top level; "
        f"download it into the data folder or point at a copy with {option} PATH."
    )


def read_list(path: Path) -> list[str]:
    """Image names of an official list (one per line; the release has no final newline)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split list {path}: {exc}; expected one image name a "
                        "line (UTF-8 text)") from None
    return [n for n in names if n]


def read_metadata(path: Path) -> dict[str, np.ndarray]:
    """Parse ``Data_Entry_2017*.csv`` (plain or gzip) into row-aligned arrays."""
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path} is empty; expected the NIH metadata CSV") from None
            columns = {name.strip(): i for i, name in enumerate(header)}
            absent = [c for c in REQUIRED_COLUMNS if c not in columns]
            if absent:
                raise DataError(
                    f"{path} lacks column(s) {', '.join(repr(c) for c in absent)}; "
                    f"an NIH metadata file has {', '.join(REQUIRED_COLUMNS)}"
                )
            idx = [columns[c] for c in REQUIRED_COLUMNS]
            width = max(idx) + 1
            rows = []
            for r in reader:
                if r and len(r) < width:
                    raise DataError(f"{path}, row {reader.line_num}: {len(r)} cells, too few "
                                    f"for the header's {len(header)}")
                if r:
                    rows.append([r[i] for i in idx])
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as exc:
        raise DataError(f"cannot read metadata file {path}: {exc}") from exc

    if not rows:
        raise DataError(f"{path} has a header but no rows")
    image_id, finding, follow, patient, age, sex, view = (list(c) for c in zip(*rows))
    labels = np.zeros((len(rows), len(LABELS)), dtype=np.uint8)
    for r, text in enumerate(finding):
        try:
            labels[r] = parse_finding_labels(text)
        except DataError as exc:
            raise DataError(f"{path}, row {r + 2} ({image_id[r]}), column 'Finding Labels': "
                            f"{exc}") from None
    try:
        patient_arr = np.array(patient, dtype=np.int64)
        follow_arr = np.array(follow, dtype=np.int64)
    except ValueError:
        bad = next(r for r, (p, fu) in enumerate(zip(patient, follow))
                   if not (p.strip().isdigit() and fu.strip().isdigit()))
        raise DataError(
            f"{path}, row {bad + 2} ({image_id[bad]}): 'Patient ID' {patient[bad]!r} and "
            f"'Follow-up #' {follow[bad]!r} must be integers"
        ) from None
    ids = np.array(image_id, dtype=str)
    if len(np.unique(ids)) != len(ids):
        uniq, counts = np.unique(ids, return_counts=True)
        raise DataError(f"{path} lists image(s) more than once: {', '.join(uniq[counts > 1][:5])}")
    return {
        "image_id": ids,
        "patient_id": patient_arr,
        "follow_up": follow_arr,
        "labels": labels,
        "view": np.array([v.strip().upper() for v in view], dtype=str),
        "age": np.array([parse_age(a) for a in age], dtype=np.float32),
        "sex": np.array([s.strip().upper() for s in sex], dtype=str),
    }


def find_images(root: Path) -> dict[str, str]:
    """Map image name -> path for every PNG under the layouts people have.

    Looks in ``root/images_*/images/`` (the official release), ``root/images_*/``,
    ``root/images/`` and ``root`` itself (a flat folder). The first path seen for a
    name wins.
    """
    found: dict[str, str] = {}
    dirs = [root / "images", root]
    try:
        top = sorted((e for e in os.scandir(root) if e.is_dir() and e.name.startswith("images_")),
                     key=lambda e: e.name, reverse=True)
    except OSError as exc:
        raise DataError(f"cannot list data folder {root}: {exc}") from exc
    for entry in top:
        dirs[:0] = [Path(entry.path) / "images", Path(entry.path)]
    for d in sorted(set(dirs), key=dirs.index):
        if not d.is_dir():
            continue
        for entry in os.scandir(d):
            if entry.name.endswith(IMAGE_SUFFIXES) and entry.name not in found:
                found[entry.name] = entry.path
    return found


# ---------------------------------------------------------------------------------------
# Loading


def load_nih(
    root: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    train_val_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    view: str = "all",
    val_fraction: float = 0.1,
    seed: int = 7,
    missing: str = "error",
) -> NIHDataset:
    """Read an NIH release into an :class:`NIHDataset` with patient-disjoint splits.

    Args:
        root: the data folder (any layout :func:`find_images` knows).
        csv_path, train_val_list, test_list: copies elsewhere of the official files.
        view: ``all``, ``PA`` or ``AP``.
        val_fraction: share of train_val *patients* held out as val.
        seed: seeds the patient split; the same seed gives the same split.
        missing: what to do with images the metadata names but the disk lacks:
            ``error`` (default; the message counts them and names a few), ``drop``
            (keep what is present, e.g. the 5% sample or a partial download) or
            ``keep`` (keep the rows with an empty path, for summaries).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    if missing not in MISSING_POLICIES:
        raise DataError(f"unknown missing-image policy {missing!r}; "
                        f"expected one of {', '.join(MISSING_POLICIES)}")

    meta_path = find_metadata(root, Path(csv_path) if csv_path else None)
    tv_path = find_list(root, TRAIN_VAL_LIST, Path(train_val_list) if train_val_list else None,
                        "--train-val-list")
    test_path = find_list(root, TEST_LIST, Path(test_list) if test_list else None, "--test-list")
    meta = read_metadata(meta_path)
    row_of = {name: r for r, name in enumerate(meta["image_id"])}

    split = np.full(len(row_of), "", dtype="<U9")  # fits "train_val"
    for list_path, name in ((tv_path, "train_val"), (test_path, "test")):
        names = read_list(list_path)
        unknown = [n for n in names if n not in row_of]
        if unknown:
            raise DataError(
                f"{list_path} names {len(unknown)} image(s) absent from {meta_path.name} "
                f"(first: {', '.join(unknown[:5])}); use the list and metadata of the same "
                "release, or fix the list"
            )
        rows = np.fromiter((row_of[n] for n in names), dtype=np.int64, count=len(names))
        clash = rows[split[rows] != ""]
        if len(clash):
            raise DataError(f"{list_path} repeats or overlaps the other list on "
                            f"{', '.join(meta['image_id'][clash[:5]])}")
        split[rows] = name
    if (split == "").any():
        log.info("%d metadata rows are in neither list and are left out", (split == "").sum())

    check_patient_disjoint(meta["patient_id"], split == "train_val", split == "test",
                           meta["image_id"], what=f"{tv_path.name} and {test_path.name}")
    is_val = split_train_val_by_patient(meta["patient_id"], split == "train_val",
                                        val_fraction=val_fraction, seed=seed)
    split[(split == "train_val") & ~is_val] = "train"
    split[is_val] = "val"

    on_disk = find_images(root)
    paths = present_inside(root, [on_disk.get(n, "") for n in meta["image_id"]],
                           meta_path.name)  # a link leading out of the folder is refused
    keep = split != ""
    if view != "all":
        keep &= meta["view"] == view
    absent = keep & (paths == "")
    missing_names = list(meta["image_id"][absent])
    if missing_names and missing == "error":
        if len(missing_names) == keep.sum():
            raise DataError(
                f"none of the {keep.sum()} images named by {meta_path.name} is under {root} "
                "(looked in images_*/images/, images/ and the folder itself); "
                "is this the right data folder?"
            )
        raise DataError(
            f"{len(missing_names)} of {keep.sum()} images named by {meta_path.name} are not under "
            f"{root} (first: {', '.join(missing_names[:5])}); to continue with the images that "
            "are present, pass --allow-missing (in Python: missing='drop')"
        )
    if missing == "drop":
        keep &= paths != ""

    dataset = NIHDataset(
        root=root,
        split=split,
        path=paths.astype(str),
        missing=missing_names,
        sources={"metadata": str(meta_path), "train_val_list": str(tv_path),
                 "test_list": str(test_path), "view": view,
                 "val_fraction": str(val_fraction), "seed": str(seed)},
        **meta,
    ).subset(np.flatnonzero(keep))
    dataset.split = dataset.split.astype("<U5")
    log.info("loaded %d images of %d patients from %s", len(dataset),
             len(np.unique(dataset.patient_id)), root)
    return dataset


def detect(root: Path) -> bool:
    """A folder with NIH's metadata file (``Data_Entry_2017*.csv[.gz]``)."""
    return any((Path(root) / name).is_file() for name in METADATA_NAMES)


#: The reader interface of :mod:`cxrembed.data.readers`.
load = load_nih
