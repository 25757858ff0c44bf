"""The paper's published figures, shipped with the package (read them through
:mod:`cxrembed.compare`, which the CLI, the demo and the report use).

``table1.csv`` (beside this module) is the paper's Table 1, "AUC Comparison vs SOTA Models
from Bhardwaj et al. [3]": per-class NIH ChestX-ray14 AUCs of CheXzero, ImCLIP, CXR-CLIP,
MoCoCLIP (quoted by the paper from Bhardwaj et al.) and of the paper itself ("My Version"
in its text). It was transcribed from the paper's text and checked against it cell by cell
(14 classes x 5 methods, no disagreement); the paper spells the columns CheXZero, CXRCCLIP
and My Version, the CSV CheXzero, CXR-CLIP and paper.

Rounding rule: the paper's "Average AUC" row (:data:`PUBLISHED_MEAN`) equals the mean of
its 14 per-class values rounded half up to 3 decimals (exact decimal arithmetic);
:func:`mean_of_table` computes it so.
"""

from __future__ import annotations

import csv
import io
import os
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from importlib import resources
from pathlib import Path

from cxrembed.errors import DataError
from cxrembed.labels import LABELS, canonical

PAPER = "Dalsania 2025"
PAPER_TITLE = ("Label-Efficient Chest X-ray Diagnosis via Partial CLIP Adaptation "
               "(arXiv 2507.07254)")
#: Table 1's methods in its column order; the last is the paper itself.
METHODS: tuple[str, ...] = ("CheXzero", "ImCLIP", "CXR-CLIP", "MoCoCLIP", PAPER)

#: Table 1, "Average AUC" row (NIH ChestX-ray14, 14 classes), as printed.
PUBLISHED_MEAN: dict[str, float] = {
    "CheXzero": 0.706,
    "ImCLIP": 0.564,
    "CXR-CLIP": 0.719,
    "MoCoCLIP": 0.749,
    PAPER: 0.750,
}
#: Table 2, the paper's few-shot mean AUC by shots per class (one draw, one seed); its
#: 0 shots is the adapted model's supervised head, not text zero-shot.
PUBLISHED_FEWSHOT: dict[int, float] = {0: 0.7502, 1: 0.7502, 2: 0.7513, 4: 0.7511,
                                       8: 0.7527, 16: 0.7542}
#: The shipped table's name, for messages and provenance.
TABLE1_SOURCE = "cxrembed/published/table1.csv (the paper's Table 1)"


@cache
def published_per_class() -> dict[str, dict[str, float]]:
    """The shipped Table 1: ``{method: {class: auc}}`` for the 5 methods and 14 classes."""
    text = resources.files(__package__).joinpath("table1.csv").read_text(encoding="utf-8")
    table = parse_table(text, TABLE1_SOURCE)
    missing = [(m, c) for m in METHODS for c in LABELS if c not in table.get(m, {})]
    if missing:  # pragma: no cover - guards the shipped file
        raise DataError(f"{TABLE1_SOURCE} lacks {missing[:3]}")
    return table


def load_published_table(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per-class published AUCs from a CSV: a ``class`` column (any spelling of the 14
    classes), then one column per method named as in :data:`METHODS` (``paper`` for the
    paper itself). Empty cells are allowed; anything else wrong is named."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read published table {path}: {exc}") from None
    return parse_table(text, str(path))


def parse_table(text: str, where: str) -> dict[str, dict[str, float]]:
    """The CSV text of a published table -> ``{method: {class: auc}}`` (see above)."""
    aliases = {m.lower(): m for m in METHODS} | {"paper": PAPER}
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "class" not in rows[0]:
        raise DataError(f"{where} needs a header 'class,<method>,...' and one row per class")
    methods = {}
    for column in rows[0]:
        if column != "class":
            if (column or "").strip().lower() not in aliases:
                raise DataError(f"{where}: unknown method column {column!r}; expected some of "
                                f"{', '.join(METHODS)} (or 'paper')")
            methods[column] = aliases[column.strip().lower()]
    table: dict[str, dict[str, float]] = {m: {} for m in methods.values()}
    for line, row in enumerate(rows, start=2):
        try:
            name = canonical(row["class"] or "")
        except DataError as exc:
            raise DataError(f"{where}, row {line}: {exc}") from None
        for column, method in methods.items():
            cell = (row[column] or "").strip()
            if not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{where}, row {line}, column {column!r}: {cell!r} is not an "
                                "AUC in [0, 1]")
            table[method][name] = value
    return table


def mean_of_table(per_class: dict[str, float]) -> float:
    """The mean over the 14 classes, rounded as the paper rounds (half up, 3 decimals)."""
    if set(per_class) != set(LABELS):
        raise DataError(f"a Table 1 mean needs all 14 classes; got {len(per_class)}")
    total = sum(Decimal(repr(v)) for v in per_class.values()) / len(LABELS)
    return float(total.quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))
