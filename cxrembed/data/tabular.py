"""Reading label CSVs (plain or gzip): columns by name, label cells, image paths.

Shared by the CheXpert, MIMIC, PadChest and generic CSV readers, so that every one of them
says the same thing about the same mistake: a missing column lists the columns there are,
a bad label cell names file, row, column and value, a path may not leave the data folder.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrembed.errors import ConfigError, DataError

#: What an uncertain label (-1) becomes: ``ignore`` masks it out of loss and AUC (the
#: default), ``ones`` / ``zeros`` count it as positive / negative (the CheXpert paper's
#: U-Ignore, U-Ones and U-Zeros).
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
#: What a blank cell means: CheXpert's labeller leaves a finding blank when the report does
#: not mention it, which the CheXpert paper and most training code read as negative.
BLANK_POLICIES = ("negative", "unknown")
_POSITIVE = {"1", "1.0", "1.", "+1", "true", "yes"}
_NEGATIVE = {"0", "0.0", "0.", "-0", "-0.0", "false", "no"}
_UNCERTAIN = {"-1", "-1.0", "-1."}
_BLANK = {"", "nan", "na"}


@dataclass
class CsvTable:
    """A CSV read into memory: its header and one list of cells per column."""

    path: Path
    header: list[str]
    columns: dict[str, list[str]]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def column(self, name: str, option: str | None = None) -> list[str]:
        """Cells of a column; a DataError listing the columns there are when it is absent."""
        if name not in self.columns:
            how = f" (given by {option})" if option else ""
            raise DataError(f"{self.path} has no column {name!r}{how}; its columns are: "
                            f"{', '.join(repr(c) for c in self.header)}")
        return self.columns[name]

    def require(self, names: list[str] | tuple[str, ...], what: str) -> None:
        """All of ``names`` or one error naming every absent one and the columns there are."""
        absent = [n for n in names if n not in self.columns]
        if absent:
            raise DataError(f"{self.path} lacks column(s) {', '.join(repr(c) for c in absent)} "
                            f"that {what} has; its columns are: "
                            f"{', '.join(repr(c) for c in self.header)}")


def open_text(path: Path) -> io.TextIOBase:
    """A text handle on a CSV, gzip or plain (BOM stripped)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_csv(path: str | os.PathLike) -> CsvTable:
    """Every row of a CSV (plain or ``.gz``), as columns of strings, header stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist")
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{path} is empty; expected a CSV with a header row") from None
            body = [r for r in reader if r]
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as exc:
        raise DataError(f"cannot read CSV file {path}: {exc}") from exc
    if not body:
        raise DataError(f"{path} has a header but no rows")
    width = len(header)
    for r, row in enumerate(body):
        if len(row) != width:
            raise DataError(f"{path}, row {r + 2}: {len(row)} cells, the header has {width}")
    columns = {name: [row[i] for row in body] for i, name in enumerate(header)}
    return CsvTable(path, header, columns)


def check_policies(uncertain: str, blank: str = "negative") -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"unknown --uncertain {uncertain!r}; expected one of "
                          f"{', '.join(UNCERTAIN_POLICIES)}")
    if blank not in BLANK_POLICIES:
        raise ConfigError(f"unknown --blank {blank!r}; expected one of "
                          f"{', '.join(BLANK_POLICIES)}")


def label_columns(table: CsvTable, names: list[str], *, uncertain: str, blank: str,
                  ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label matrix (uint8 N×K) and known mask (bool N×K) of 1 / 0 / -1 / blank columns.

    Uncertain (-1) cells follow ``uncertain``; blank cells ``blank``. Any other value is a
    DataError naming file, row, column and value.
    """
    check_policies(uncertain, blank)
    n = len(table)
    labels = np.zeros((n, len(names)), dtype=np.uint8)
    known = np.ones((n, len(names)), dtype=bool)
    for k, name in enumerate(names):
        cells = np.array(table.column(name), dtype=str)
        value = np.char.lower(np.char.strip(cells))
        positive, uncertain_cell = np.isin(value, list(_POSITIVE)), np.isin(value, list(_UNCERTAIN))
        blank_cell = np.isin(value, list(_BLANK))
        bad = ~(positive | uncertain_cell | blank_cell | np.isin(value, list(_NEGATIVE)))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            which = f" ({ids[r]})" if ids else ""
            raise DataError(f"{table.path}, row {r + 2}{which}, column {name!r}: value "
                            f"{str(cells[r])!r} is not a label; expected 1, 0, -1 (uncertain) or "
                            "blank")
        labels[positive, k] = 1
        if uncertain == "ones":
            labels[uncertain_cell, k] = 1
        elif uncertain == "ignore":
            known[uncertain_cell, k] = False
        if blank == "unknown":
            known[blank_cell, k] = False
    return labels, known


def resolve_image(root: Path, relative: str, where: str) -> str:
    """``root / relative`` as a string, refusing an absolute path or one that leaves
    ``root`` (``..``): a CSV must not make cxrembed read files outside the data folder."""
    rel = relative.strip().replace("\\", "/")
    if not rel:
        raise DataError(f"{where}: empty image path")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: image path {relative!r} is absolute; paths must be relative "
                        f"to the data folder {root}")
    base = os.path.normpath(root)
    if ".." not in rel.split("/"):  # plain string work: this runs once per row
        return f"{base}{os.sep}{rel}"
    full = os.path.normpath(os.path.join(base, rel))
    if not full.startswith(base + os.sep):
        raise DataError(f"{where}: image path {relative!r} leaves the data folder {root}; "
                        "paths must stay inside it")
    return full


def parse_age(cell: str) -> float:
    """Years from ``58``, ``58.0`` or ``058Y``; NaN when empty or unreadable."""
    cell = cell.strip().rstrip("YyMmDd")
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def parse_sex(cell: str) -> str:
    """``M`` / ``F`` from M, F, Male, Female (any case); ``""`` otherwise."""
    value = cell.strip().upper()[:1]
    return value if value in ("M", "F") else ""


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` (each also tried with ``.gz``) that is a file in ``root``."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                   "validate": "val", "validation": "val", "dev": "val", "test": "test",
                   "testing": "test", "": ""}


def parse_split(cell: str, where: str) -> str:
    """``train`` / ``val`` / ``test`` from the spellings collections use; blank -> ``""``."""
    value = cell.strip().lower()
    if value not in SPLIT_SPELLINGS:
        raise DataError(f"{where}: split {cell!r} is not one of train, val (valid, validate, "
                        "validation), test or blank")
    return SPLIT_SPELLINGS[value]


#: True while :func:`cxrembed.data.load_dataset` reads with ``follow_links=True``
#: (``--follow-links``): links inside the data folder are followed wherever they lead.
FOLLOW_LINKS: ContextVar[bool] = ContextVar("cxrembed_follow_links", default=False)


def inside(real_root: str, real: str) -> bool:
    """Whether the real path ``real`` lies in the real folder ``real_root``."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def present_inside(root: Path, paths: list[str] | np.ndarray, where: str) -> np.ndarray:
    """``path`` where it is a file inside ``root`` once links are followed, ``""`` where
    absent. A symbolic link (to a file, or a folder on the way) that leads out of the data
    folder is a DataError, as a ``..`` path is: it could make cxrembed read, and serve,
    any file; unless the user said the links are theirs (``--follow-links``, see
    :data:`FOLLOW_LINKS`): then a link inside the folder is followed wherever it leads
    (``paths`` themselves are inside ``root``: the readers refuse ``..`` and absolute
    paths). One ``lstat`` per path (what the existence check cost before) and one
    ``realpath`` per link or folder."""
    import stat

    real_root = os.path.realpath(root)
    follow = FOLLOW_LINKS.get()
    real_dirs: dict[str, str] = {}
    out = np.empty(len(paths), dtype=object)
    escaping: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        out[i] = ""
        if not path:
            continue
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            real = os.path.realpath(path)
            if not os.path.isfile(real):
                continue
        elif stat.S_ISREG(mode):
            folder = os.path.dirname(path)
            if folder not in real_dirs:
                real_dirs[folder] = os.path.realpath(folder)
            real = os.path.join(real_dirs[folder], os.path.basename(path))
        else:
            continue
        if not follow and not inside(real_root, real):
            escaping.append((str(path), real))
        out[i] = path
    if escaping:
        link, target = escaping[0]
        raise DataError(f"{len(escaping)} image(s) named by {where} are symbolic links (or under "
                        f"a linked folder) leading out of the data folder {root} (first: {link}"
                        f" -> {target}); cxrembed reads only files inside it. If you made these "
                        "links (e.g. images_001 -> a bigger disk), pass --follow-links (in "
                        "Python: follow_links=True) to read through links inside the data "
                        "folder; otherwise copy the images in, or pass the folder they really "
                        "are in as the data folder")
    return out
