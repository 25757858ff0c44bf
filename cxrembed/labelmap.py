"""Maps between label vocabularies: which class of one collection is which of another.

A label map is a CSV whose header names vocabularies (``nih``, ``chexpert``, ``mimic``,
``padchest``, or your own) and whose rows are findings that mean the same thing in each
(a blank cell: that vocabulary has no such finding)::

    nih,chexpert,mimic,padchest
    Effusion,Pleural Effusion,Pleural Effusion,pleural effusion
    Edema,Edema,Edema,pulmonary edema

The shipped map (``labelmaps/shared_findings.csv``) holds only exact equivalents. Left out
on purpose, as loose: NIH Nodule / Mass vs CheXpert Lung Lesion (a broader class), NIH
Infiltration vs Lung Opacity, NIH Pleural Thickening vs Pleural Other, NIH Hernia vs
PadChest hiatal hernia (NIH's class is any hernia), CheXpert Fracture vs PadChest fracture
(PadChest files rib and clavicle fractures under their own labels). CheXpert and MIMIC
share the CheXpert labeller's vocabulary, so all 13 of theirs map one to one.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from cxrembed.errors import ConfigError, DataError

SHIPPED = Path(__file__).resolve().parent / "labelmaps" / "shared_findings.csv"


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


@dataclass(frozen=True)
class LabelMap:
    """Rows of equivalent findings, one column per vocabulary."""

    vocabularies: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    source: str

    def pairs(self, source: str, target: str, source_names: list[str] | tuple[str, ...],
              target_names: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
        """``(source column, target column)`` of every finding both label sets hold, in
        ``target_names`` order. Identical names always pair (same vocabulary or not)."""
        src = {_key(n): i for i, n in enumerate(source_names)}
        pairs: dict[int, int] = {}
        for j, name in enumerate(target_names):
            if _key(name) in src:
                pairs[j] = src[_key(name)]
        if source != target:
            a, b = self.column(source), self.column(target)
            for row in self.rows:
                s, t = _key(row[a]), _key(row[b])
                if not s or not t or s not in src:
                    continue
                for j, name in enumerate(target_names):
                    if _key(name) == t:
                        pairs.setdefault(j, src[s])
        return [(pairs[j], j) for j in sorted(pairs)]

    def column(self, vocabulary: str) -> int:
        try:
            return self.vocabularies.index(vocabulary.strip().lower())
        except ValueError:
            raise ConfigError(f"label map {self.source} has no {vocabulary!r} column; its "
                              f"columns are {', '.join(self.vocabularies)} (add one, or pass "
                              "--label-map FILE with it)") from None


def load_label_map(path: str | os.PathLike | None = None) -> LabelMap:
    """Read a label map CSV (the shipped one when ``path`` is None)."""
    path = Path(path) if path is not None else SHIPPED
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = [row for row in csv.reader(f) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read label map {path}: {exc}; expected a UTF-8 CSV") from None
    if len(table) < 2 or len(table[0]) < 2:
        raise DataError(f"label map {path} needs a header naming two or more vocabularies "
                        "(e.g. nih,chexpert) and one row per shared finding")
    header = tuple(h.strip().lower() for h in table[0])
    if len(set(header)) != len(header) or not all(header):
        raise DataError(f"label map {path}: header {table[0]} must name each vocabulary once")
    rows = []
    for r, row in enumerate(table[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"label map {path}, row {r}: {len(row)} cells, the header has "
                            f"{len(header)}")
        rows.append(tuple(c.strip() for c in row))
    for k, vocab in enumerate(header):
        seen = [_key(row[k]) for row in rows if row[k]]
        twice = {n for n in seen if seen.count(n) > 1}
        if twice:
            raise DataError(f"label map {path}: {vocab} names {', '.join(sorted(twice))} in "
                            "more than one row; a finding maps to one finding")
    return LabelMap(header, tuple(rows), str(path))
