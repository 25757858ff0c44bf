"""The comparison table itself: its columns, few-shot series and encoders, laid out as
Table 1 (classes x columns) and the few-shot table (shots x series), saved as JSON and CSV.

:func:`cxrembed.compare.compare_results` fills it from saved results; this module only
holds and writes what it was given.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxrembed.labels import LABELS
from cxrembed.published import PAPER, PAPER_TITLE, PUBLISHED_FEWSHOT, PUBLISHED_MEAN


@dataclass
class EncoderRef:
    """An encoder our columns were scored with: ``E1``... and what it is."""

    id: str
    label: str
    fingerprint_sha256: str | None
    stores: list[str] = field(default_factory=list)


@dataclass
class Column:
    """One column of Table 1: a published method, or one of our protocols."""

    method: str  # a published method ("CheXzero") or ours ("zeroshot", "linear" ...)
    per_class: dict[str, float | None]
    mean: float | None
    shots: int | None = None  # few-shot heads: shots per class; else None
    encoder: str | None = None  # EncoderRef.id (ours only)
    tag: str | None = None  # tells apart two results of the same method and encoder
    published: bool = False
    std: float | None = None
    ci: tuple[float | None, float | None] | None = None
    source: str = ""
    eval_set: dict[str, Any] | None = None
    eval_set_id: str | None = None  # "T1"... only when sets are mixed (allow_mixed)

    @property
    def name(self) -> str:
        """The column's full name (CSV header, JSON key)."""
        if self.published:
            return f"{self.method} (published)"
        text = self.method + (f" {self.shots}-shot" if self.shots else "")
        labels = [x for x in (self.encoder, self.eval_set_id) if x]
        text += f" [{', '.join(labels)}]" if labels else ""
        return text + (f" ({self.tag})" if self.tag else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass
class FewShotSeries:
    """One head of one few-shot result: its mean AUC cell per shot count."""

    method: str
    cells: dict[int, dict[str, float | None]]
    encoder: str | None = None
    tag: str | None = None
    eval_set_id: str | None = None
    source: str = ""
    eval_set: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        labels = [x for x in (self.encoder, self.eval_set_id) if x]
        return (self.method + (f" [{', '.join(labels)}]" if labels else "")
                + (f" ({self.tag})" if self.tag else ""))


@dataclass
class Comparison:
    """Table 1 layout (classes x columns) and the few-shot table (shots x series)."""

    published: list[Column]
    ours: list[Column]
    fewshot: list[FewShotSeries] = field(default_factory=list)
    encoders: list[EncoderRef] = field(default_factory=list)
    eval_sets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what makes the table questionable (mixed test sets, missing set records)
    warnings: list[str] = field(default_factory=list)
    #: None when our classes are NIH's (Table 1's own layout); else our class -> the NIH
    #: class whose published figures are shown beside it (only the classes that match)
    published_classes: dict[str, str] | None = None
    #: the collections our results were scored on (``nih``, ``chexpert``, ...)
    datasets: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[Column]:
        return self.published + self.ours

    def classes(self) -> list[str]:
        """The rows' classes: NIH's 14 (then any other) when our classes are NIH's, else
        ours, any number, in first-seen order (a CheXpert or CSV result keeps its own)."""
        names = list(dict.fromkeys(n for col in self.ours for n in col.per_class))
        if self.published_classes is None:
            names = list(LABELS) + [n for n in names if n not in LABELS]
        return names

    def table1(self) -> list[dict[str, Any]]:
        """Rows (the classes, then ``Mean``): published columns, then ours. Outside NIH's
        layout a published cell is filled only for a class that matches an NIH class
        (:attr:`published_classes`), and the published means (over NIH's 14) are left out."""
        rows = []
        match = self.published_classes
        for name in self.classes() + ["Mean"]:
            row: dict[str, Any] = {"class": name}
            for col in self.columns:
                if name == "Mean":
                    row[col.name] = None if col.published and match is not None else col.mean
                elif col.published and match is not None:
                    row[col.name] = col.per_class.get(match.get(name, ""))
                else:
                    row[col.name] = col.per_class.get(name)
            rows.append(row)
        return rows

    def fewshot_table(self) -> list[dict[str, Any]]:
        """Rows by shots: the paper's mean, then each of our series (mean, std, CI)."""
        shots = sorted(set(PUBLISHED_FEWSHOT) | {k for s in self.fewshot for k in s.cells})
        return [{"shots": k, f"{PAPER} (published)": PUBLISHED_FEWSHOT.get(k),
                 **{s.name: s.cells.get(k) for s in self.fewshot}} for k in shots]

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cxrembed.compare", "format_version": 2, "paper": PAPER_TITLE,
                "published_mean": PUBLISHED_MEAN, "published_fewshot": PUBLISHED_FEWSHOT,
                "published_source": self.published[0].source if self.published else None,
                "notes": self.notes, "warnings": self.warnings, "classes": self.classes(),
                "datasets": self.datasets, "published_classes": self.published_classes,
                "encoders": [asdict(e) for e in self.encoders], "eval_sets": self.eval_sets,
                "columns": [c.to_dict() for c in self.columns],
                "table1": self.table1(), "fewshot": self.fewshot_table()}

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


