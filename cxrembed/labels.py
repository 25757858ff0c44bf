"""The 14 ChestX-ray14 classes in the paper's order, their CSV spellings, and prompts."""

from __future__ import annotations

import numpy as np

from cxrembed.errors import DataError

#: The 14 classes in the order of the paper's Table 1 (and of every label matrix here).
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
)
NUM_CLASSES = len(LABELS)
NO_FINDING = "No Finding"

#: NIH share of images carrying each label (of 112,120), in LABELS order.
NIH_PREVALENCE: tuple[float, ...] = (
    0.103, 0.042, 0.177, 0.047, 0.021, 0.022, 0.015,
    0.119, 0.013, 0.030, 0.025, 0.057, 0.052, 0.002,
)

# Every spelling seen in the releases maps to the canonical name; matching ignores case.
_SPELLINGS = {name.lower(): name for name in LABELS}
_SPELLINGS["pleural_thickening"] = "Pleural Thickening"
_INDEX = {name: i for i, name in enumerate(LABELS)}

#: The spelling the official CSV uses, for writers that must match it byte for byte.
CSV_SPELLING = {name: name.replace("Pleural Thickening", "Pleural_Thickening") for name in LABELS}


def canonical(name: str) -> str:
    """Return the canonical class name for any accepted spelling, or raise DataError."""
    key = name.strip().lower()
    if key in _SPELLINGS:
        return _SPELLINGS[key]
    raise DataError(
        f"unknown label {name!r}; expected one of: {', '.join(LABELS)} or {NO_FINDING!r}"
    )


def label_index(name: str) -> int:
    """Column of a class in every label matrix."""
    return _INDEX[canonical(name)]


def parse_finding_labels(text: str) -> np.ndarray:
    """Parse a ``Finding Labels`` cell (``A|B`` or ``No Finding``) into a 14-vector of 0/1."""
    row = np.zeros(NUM_CLASSES, dtype=np.uint8)
    for part in text.split("|"):
        part = part.strip()
        if not part or part.lower() == NO_FINDING.lower():
            continue
        row[_INDEX[canonical(part)]] = 1
    return row


def format_finding_labels(row: np.ndarray) -> str:
    """Inverse of :func:`parse_finding_labels`, with the CSV's spellings."""
    names = [CSV_SPELLING[LABELS[i]] for i in np.flatnonzero(row)]
    return "|".join(names) if names else NO_FINDING


NO_FINDING_PROMPT = "no finding"


def default_prompts(label_names: tuple[str, ...] | list[str] | None = None
                    ) -> dict[str, tuple[list[str], list[str]]]:
    """Per class: (positive prompts, negative prompts), see :mod:`cxrembed.prompts`.

    ``label_names`` are any dataset's classes (default: NIH's 14); the prompt pair of a
    class is made from its name, lower case, underscores as spaces.
    """
    from cxrembed.prompts import default_prompts as defaults

    return defaults(LABELS if label_names is None else label_names)
