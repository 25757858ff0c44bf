"""Which of our classes sit beside which of the paper's (NIH ChestX-ray14) in Table 1.

The published figures are NIH's 14 classes. A result on another collection keeps its own
classes as rows; a published cell is shown only where one of them is the same finding as
an NIH class, by name or through a label map (:mod:`cxrembed.labelmap`: the shipped map
holds exact equivalents only, e.g. CheXpert's Pleural Effusion = NIH's Effusion).
"""

from __future__ import annotations

import os
from typing import Any

from cxrembed.errors import ConfigError, DataError
from cxrembed.labels import LABELS, canonical


def dataset_of(obj: dict[str, Any], names: list[str]) -> str:
    """The collection a result was scored on: as recorded (``source.dataset``, or the label
    map record of an adapted head on another collection), else ``nih`` when its classes
    are NIH's names, else ``unknown``."""
    source = obj.get("source") or {}
    recorded = source.get("dataset") or (source.get("label_map") or {}).get("store")
    if recorded:
        return str(recorded)
    return "nih" if _nih_names(names) else "unknown"


def _nih_names(names: list[str]) -> bool:
    """Whether every name is an NIH class (in any of its spellings)."""
    try:
        for name in names:
            canonical(name)
    except DataError:
        return False
    return True


def match_published(comparison: Any, label_map: str | os.PathLike | None) -> None:
    """Outside NIH's classes, pair our classes with NIH's (identical names, or the label
    map's rows) for the published columns, drop those columns when none pairs, and say so."""
    from cxrembed.labelmap import load_label_map

    names = list(dict.fromkeys(n for col in comparison.ours for n in col.per_class))
    if not names or (_nih_names(names) and set(comparison.datasets) <= {"nih", "unknown"}):
        return  # NIH's own classes: Table 1's layout
    mapping = load_label_map(label_map)
    match: dict[str, str] = {}
    for dataset in comparison.datasets:
        try:
            pairs = mapping.pairs("nih", dataset, LABELS, names)
        except ConfigError:  # a vocabulary the map has no column for: identical names only
            pairs = mapping.pairs("nih", "nih", LABELS, names)
        for h, c in pairs:
            match.setdefault(names[c], LABELS[h])
    comparison.published_classes = match
    where = f"{', '.join(comparison.datasets)}: {len(names)} classes of its own"
    if not match:
        comparison.published = []
        comparison.notes.append(f"classes: the store's own ({where}); none matches an NIH "
                                f"ChestX-ray14 class (label map {mapping.source}), so the "
                                "paper's Table 1 is not shown")
        return
    pairs_text = ", ".join(n if n == m else f"{n} = NIH {m}" for n, m in match.items())
    comparison.notes.append(
        f"classes: the store's own ({where}); the paper's Table 1 (NIH ChestX-ray14) is shown "
        f"only beside the {len(match)} that match an NIH class ({pairs_text}; by name or "
        f"label map {mapping.source}); its means, over NIH's 14 classes, are left out")
