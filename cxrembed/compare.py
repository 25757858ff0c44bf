"""Our results side by side with the paper's published figures (its Table 1 and few-shot table).

Published figures available here are the **mean** NIH ChestX-ray14 AUCs of the paper's
Table 1 (CheXzero, ImCLIP, CXR-CLIP, MoCoCLIP, the paper) and its few-shot means. The
per-class columns of Table 1 are **not included**: the paper's text could not be read from
this machine (no internet; the stored copies searched held only its abstract), and numbers
are never typed in from memory. Their cells read "n/a" unless a table is given:
``cxrembed compare ... --published table1.csv`` (see :func:`load_published_table`).

How the paper's figures were obtained (from its text and public notebooks) and why ours
differ in kind, not only in value:

* its "zero-shot" 0.7502 is the adapted model's supervised head on the test set (no text
  prompt): our ``adapted-head`` column is that protocol, ``zeroshot`` is real text
  zero-shot;
* its few-shot figures are one draw with one seed; ours are means over seeds with std and
  patient-bootstrap intervals;
* its train/val split was by image (patients leak) and test AUC picked epochs; ours split
  by patient and select on val only.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cxrembed.errors import DataError
from cxrembed.fewshot.results import load_result
from cxrembed.labels import LABELS

PAPER = "Dalsania 2025"
PAPER_TITLE = "Label-Efficient Chest X-ray Diagnosis via Partial CLIP Adaptation (arXiv 2507.07254)"

#: Table 1, mean AUC on NIH ChestX-ray14, as published.
PUBLISHED_MEAN: dict[str, float] = {
    "CheXzero": 0.706,
    "ImCLIP": 0.564,
    "CXR-CLIP": 0.719,
    "MoCoCLIP": 0.749,
    PAPER: 0.750,
}
#: Table 1 per class: not available here (see the module docstring); {method: {class: auc}}.
PUBLISHED_PER_CLASS: dict[str, dict[str, float]] = {}
PER_CLASS_NOTE = ("published per-class values are not included: the paper's Table 1 could "
                  "not be read on this machine (only its abstract was found) and numbers are "
                  "never typed in from memory; only the published means are shown")


def load_published_table(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per-class published AUCs from a CSV: a ``class`` column (any spelling of the 14
    classes), then one column per method named as in :data:`PUBLISHED_MEAN` (``paper``
    for the paper itself). Empty cells are allowed; anything else wrong is named."""
    from cxrembed.labels import canonical

    path = Path(path)
    aliases = {m.lower(): m for m in PUBLISHED_MEAN} | {"paper": PAPER}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(f"cannot read published table {path}: {exc}") from None
    if not rows or "class" not in rows[0]:
        raise DataError(f"{path} needs a header 'class,<method>,...' and one row per class")
    methods = {}
    for column in rows[0]:
        if column != "class":
            if column.strip().lower() not in aliases:
                raise DataError(f"{path}: unknown method column {column!r}; expected some of "
                                f"{', '.join(PUBLISHED_MEAN)} (or 'paper')")
            methods[column] = aliases[column.strip().lower()]
    table: dict[str, dict[str, float]] = {m: {} for m in methods.values()}
    for line, row in enumerate(rows, start=2):
        try:
            name = canonical(row["class"])
        except DataError as exc:
            raise DataError(f"{path}, row {line}: {exc}") from None
        for column, method in methods.items():
            cell = (row[column] or "").strip()
            if not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{path}, row {line}, column {column!r}: {cell!r} is not an "
                                "AUC in [0, 1]")
            table[method][name] = value
    return table


#: The paper's few-shot mean AUC by shots per class (one draw, one seed); 0 shots is its
#: adapted head, not text zero-shot.
PUBLISHED_FEWSHOT: dict[int, float] = {0: 0.7502, 1: 0.7502, 2: 0.7513, 4: 0.7511,
                                       8: 0.7527, 16: 0.7542}

_OURS_NAME = {"zeroshot": "zeroshot", "adapted": "adapted-head", "adapted-head": "adapted-head"}


@dataclass
class Column:
    """One of our protocols: per-class AUC (mean over seeds where there are seeds)."""

    name: str
    per_class: dict[str, float | None]
    mean: float | None
    std: float | None = None
    ci: tuple[float | None, float | None] | None = None
    source: str = ""


@dataclass
class Comparison:
    """Table 1 layout (classes x methods) and the few-shot table (shots x methods)."""

    ours: list[Column]
    fewshot: dict[str, dict[int, dict[str, float | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: per-class published values ({method: {class: auc}}), when a table was given
    published: dict[str, dict[str, float]] = field(default_factory=dict)

    def table1(self) -> list[dict[str, Any]]:
        """Rows (the 14 classes, then ``Mean``): published columns, then ours."""
        rows = []
        for name in list(LABELS) + ["Mean"]:
            row: dict[str, Any] = {"class": name}
            for method, mean in PUBLISHED_MEAN.items():
                if name == "Mean":
                    row[f"{method} (published)"] = mean
                else:
                    row[f"{method} (published)"] = self.published.get(method, {}).get(name)
            for col in self.ours:
                row[col.name] = col.mean if name == "Mean" else col.per_class.get(name)
            rows.append(row)
        return rows

    def fewshot_table(self) -> list[dict[str, Any]]:
        """Rows by shots: the paper's mean, then each of our heads (mean, std, CI)."""
        shots = sorted(set(PUBLISHED_FEWSHOT) | {k for h in self.fewshot.values() for k in h})
        rows = []
        for k in shots:
            row: dict[str, Any] = {"shots": k, f"{PAPER} (published)": PUBLISHED_FEWSHOT.get(k)}
            for head, cells in self.fewshot.items():
                row[head] = cells.get(k)
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cxrembed.compare", "paper": PAPER_TITLE,
                "published_mean": PUBLISHED_MEAN, "published_fewshot": PUBLISHED_FEWSHOT,
                "published_per_class_included": bool(self.published),
                "notes": self.notes, "table1": self.table1(),
                "fewshot": self.fewshot_table(),
                "ours": [{"name": c.name, "source": c.source, "mean": c.mean, "std": c.std,
                          "ci": c.ci} for c in self.ours]}

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """comparison.json, comparison_table1.csv and comparison_fewshot.csv in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "comparison.json", "table1": out / "comparison_table1.csv",
                 "fewshot": out / "comparison_fewshot.csv"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        _write_csv(paths["table1"], self.table1())
        rows = [{key: (_cell_text(v) if isinstance(v, dict) else v) for key, v in row.items()}
                for row in self.fewshot_table()]
        _write_csv(paths["fewshot"], rows)
        return paths


def _cell_text(cell: dict[str, Any]) -> str:
    text = f"{cell['mean']:.4f}"
    if cell.get("std") is not None:
        text += f" +- {cell['std']:.4f}"
    if cell.get("ci_low") is not None:
        text += f" [{cell['ci_low']:.4f}, {cell['ci_high']:.4f}]"
    return text


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def compare_results(results: Sequence[str | os.PathLike | dict[str, Any]],
                    out: str | os.PathLike | None = None,
                    published: str | os.PathLike | dict[str, dict[str, float]] | None = None
                    ) -> Comparison:
    """Build the comparison from saved results (paths) or result dicts; save it to ``out``.
    ``published``: per-class published values (a CSV for :func:`load_published_table`).

    Few-shot results contribute their training-free rows (zeroshot, adapted-head), each
    trained head at its largest shot count to Table 1, and every head to the few-shot table.
    """
    if not results:
        raise DataError("nothing to compare: pass at least one result")
    ours: list[Column] = []
    fewshot: dict[str, dict[int, dict[str, float | None]]] = {}
    if published is not None and not isinstance(published, dict):
        published = load_published_table(published)
    published = published or PUBLISHED_PER_CLASS
    notes = [] if published else [PER_CLASS_NOTE]
    notes += ["paper's 0-shot 0.7502 is its adapted supervised head, not text zero-shot",
             "paper's few-shot figures: one draw, one seed; ours: mean +- std over seeds, "
             "95% patient-bootstrap intervals"]
    for item in results:
        obj = item if isinstance(item, dict) else load_result(
            item, formats=("cxrembed.fewshot", "cxrembed.eval"))
        source = obj.get("_path", "")
        if obj.get("format") == "cxrembed.eval":
            ci = obj.get("ci", {}).get("mean_auc")
            ours.append(Column(_OURS_NAME.get(obj["protocol"], obj["protocol"]), obj["auc"],
                               obj["mean_auc"], None,
                               (ci["low"], ci["high"]) if ci else None, source))
            continue
        largest = {}
        for row in obj["summary"]:
            largest[row["head"]] = max(largest.get(row["head"], -1), row["shots"])
        for row in obj["summary"]:
            head, shots, m = row["head"], row["shots"], row["mean_auc"]
            name = _OURS_NAME.get(head, head)
            fewshot.setdefault(name, {})[shots] = m
            if shots == largest[head]:
                label = name if shots == 0 else f"{name} {shots}-shot"
                ours.append(Column(label, {c: v["mean"] for c, v in row["per_class"].items()},
                                   m["mean"], m["std"], (m["ci_low"], m["ci_high"]), source))
    seen: dict[str, int] = {}
    for col in ours:  # the same protocol from two results: keep both, tell them apart
        seen[col.name] = seen.get(col.name, 0) + 1
        if seen[col.name] > 1:
            source = Path(col.source)
            tag = source.parent.name if source.name == "fewshot.json" else source.stem
            col.name = f"{col.name} [{tag or seen[col.name]}]"
    comparison = Comparison(ours, fewshot, notes, dict(published))
    if out is not None:
        comparison.save(out)
    return comparison
