"""Our results side by side with the paper's published figures (its Table 1 and Table 2).

The published figures live in :mod:`cxrembed.published` and are read through this module
(the CLI, the demo and the report do): Table 1 per class and its means for CheXzero,
ImCLIP, CXR-CLIP, MoCoCLIP and the paper, shipped as package data, and the paper's
few-shot means.

Every column is a :class:`Column` with fields (method, shots, encoder, tag, published), so
a caller lays it out without parsing names. Our columns are labelled by the encoder whose
store they were scored on (``E1``, ``E2`` ..., see :attr:`Comparison.encoders`); results
scored on different test sets (split, size, hash of the image ids) are refused unless
``allow_mixed`` is given, and then every column names its set.

How the paper's figures were obtained and why ours differ in kind, not only in value:

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
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cxrembed.compare_classes import dataset_of, match_published
from cxrembed.errors import DataError
from cxrembed.fewshot.results import load_result
from cxrembed.labels import LABELS
from cxrembed.published import (METHODS, PAPER, PAPER_TITLE, PUBLISHED_FEWSHOT,
                                PUBLISHED_MEAN, TABLE1_SOURCE, load_published_table,
                                published_per_class)

__all__ = ["METHODS", "PAPER", "PAPER_TITLE", "PUBLISHED_FEWSHOT", "PUBLISHED_MEAN",
           "Column", "Comparison", "EncoderRef", "FewShotSeries", "compare_results",
           "load_published_table", "published_per_class", "DESCRIPTIONS"]

log = logging.getLogger(__name__)

#: What each of our protocols is (the report lists these under its table).
DESCRIPTIONS: dict[str, str] = {
    "zeroshot": "text zero-shot: CheXzero-style softmax over a positive and a negative "
                "prompt per class, on the column's encoder",
    "adapted-head": "the adapted model's own supervised head (no text prompt): the protocol "
                    "behind the paper's 'zero-shot' 0.7502",
    "mlp": "MLP head trained on K shots per class from train (mean over draws)",
    "linear": "logistic regression per class on K shots from train (mean over draws)",
    "knn": "k-nearest-neighbour vote among K shots per class (mean over draws)",
    "tip": "Tip-Adapter: prompt logits plus a cache of K shots (mean over draws)",
}
_METHOD = {"zeroshot": "zeroshot", "adapted": "adapted-head", "adapted-head": "adapted-head"}


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


def published_columns(table: dict[str, dict[str, float]] | None = None,
                      source: str = TABLE1_SOURCE) -> list[Column]:
    """Table 1's published columns (default: the shipped per-class table)."""
    table = published_per_class() if table is None else table
    return [Column(m, dict(table.get(m, {})), PUBLISHED_MEAN[m], published=True, source=source)
            for m in METHODS]


def compare_results(results: Sequence[str | os.PathLike | dict[str, Any]],
                    out: str | os.PathLike | None = None,
                    published: str | os.PathLike | dict[str, dict[str, float]] | None = None,
                    allow_mixed: bool = False, label_map: str | os.PathLike | None = None
                    ) -> Comparison:
    """Build the comparison from saved results (paths) or result dicts; save it to ``out``.

    ``published``: per-class published values, default the shipped Table 1 (a CSV path for
    :func:`load_published_table`, or a dict). Few-shot results contribute their
    training-free rows (zeroshot, adapted-head) and each trained head at its largest shot
    count to Table 1, and every head to the few-shot table. Results on different test sets
    raise DataError unless ``allow_mixed``.

    The rows are the classes of our results, any number: NIH's 14 in Table 1's order when
    they are NIH's; otherwise their own, with the published (NIH) figures beside only the
    classes that match an NIH class by name or through ``label_map`` (default: the shipped
    map of exact equivalents), as the notes say.
    """
    if not results:
        raise DataError("nothing to compare: pass at least one result")
    if published is None:
        pub = published_columns()
    elif isinstance(published, dict):
        pub = published_columns(published, "given table")
    else:
        pub = published_columns(load_published_table(published), str(published))
    ours: list[Column] = []
    series: list[FewShotSeries] = []
    encoders: dict[str, EncoderRef] = {}
    datasets: list[str] = []
    for item in results:
        obj = item if isinstance(item, dict) else load_result(
            item, formats=("cxrembed.fewshot", "cxrembed.eval"))
        cols, heads = _columns_of(obj)
        datasets.append(dataset_of(obj, [n for c in cols for n in c.per_class]))
        ref = _encoder_of(obj, encoders)
        for thing in cols + heads:
            thing.encoder = ref.id
        ours += cols
        series += heads
    comparison = Comparison(pub, ours, series, encoders=list(encoders.values()),
                            datasets=list(dict.fromkeys(datasets)))
    match_published(comparison, label_map)
    labels = [r.label for r in comparison.encoders]
    for ref in comparison.encoders:  # two encoders with one label: add the fingerprint
        if labels.count(ref.label) > 1 and ref.fingerprint_sha256:
            ref.label += f" (fingerprint {ref.fingerprint_sha256[:8]})"
    _check_eval_sets(comparison, allow_mixed)
    _tag_duplicates(comparison.ours)
    _tag_duplicates(comparison.fewshot)
    comparison.notes += [
        f"published: the paper's Table 1 ({pub[0].source}); its four baselines are quoted "
        "from Bhardwaj et al.; all on NIH ChestX-ray14's official test list"
        + ("" if comparison.published_classes is None else
           "; not the test set of our columns: a guide, not a comparison"),
        "paper's 0-shot 0.7502 is its adapted supervised head, not text zero-shot",
        "paper's few-shot figures: one draw, one seed; ours: mean +- std over seeds, "
        "95% patient-bootstrap intervals"]
    for message in comparison.warnings:
        log.warning("%s", message)
    if out is not None:
        comparison.save(out)
    return comparison


def _eval_set_of(obj: dict[str, Any]) -> dict[str, Any]:
    recorded = (obj.get("source") or {}).get("eval_set")
    if recorded:
        return dict(recorded)
    if obj.get("format") == "cxrembed.eval":
        return {"split": obj.get("split"), "n": obj.get("n_rows"), "ids_sha256": None}
    return {"split": (obj.get("config") or {}).get("test_split", "test"),
            "n": (obj.get("source") or {}).get("n_test"), "ids_sha256": None}


def _columns_of(obj: dict[str, Any]) -> tuple[list[Column], list[FewShotSeries]]:
    """Our Table 1 columns and few-shot series of one result (encoders labelled later)."""
    source, eval_set = obj.get("_path", ""), _eval_set_of(obj)
    if obj.get("format") == "cxrembed.eval":
        ci = (obj.get("ci") or {}).get("mean_auc")
        method = _METHOD.get(obj["protocol"], obj["protocol"])
        return [Column(method, obj["auc"], obj["mean_auc"],
                       ci=(ci["low"], ci["high"]) if ci else None, source=source,
                       eval_set=eval_set)], []
    largest: dict[str, int] = {}
    for row in obj["summary"]:
        largest[row["head"]] = max(largest.get(row["head"], -1), row["shots"])
    columns, by_head = [], {}
    for row in obj["summary"]:
        head, shots, m = row["head"], row["shots"], row["mean_auc"]
        method = _METHOD.get(head, head)
        by_head.setdefault(method, FewShotSeries(method, {}, source=source,
                                                  eval_set=eval_set)).cells[shots] = m
        if shots == largest[head]:
            columns.append(Column(method, {c: v["mean"] for c, v in row["per_class"].items()},
                                  m["mean"], shots=shots or None, std=m["std"],
                                  ci=(m["ci_low"], m["ci_high"]), source=source,
                                  eval_set=eval_set))
    return columns, list(by_head.values())


def encoder_label(source: dict[str, Any]) -> str:
    """A person's name for the encoder of a result's store: architecture and weights."""
    fp = source.get("fingerprint") or {}
    model = source.get("model") or fp.get("model") or "unknown encoder"
    weights = fp.get("weights") or {}
    if source.get("run") or weights.get("kind") == "run":
        return f"{model} adapted ({Path(source.get('run') or '?').name})"
    kind = weights.get("kind")
    if kind == "tag":
        return f"{model} {weights.get('tag')}"
    if kind == "none":
        return f"{model} random init"
    if kind == "file":
        return f"{model} weights file {str(weights.get('sha256') or '')[:8]}"
    return str(model)


def _encoder_of(obj: dict[str, Any], refs: dict[str, EncoderRef]) -> EncoderRef:
    """The EncoderRef of a result's store fingerprint (a new E<n> for a new one)."""
    src = obj.get("source") or {}
    fp = src.get("fingerprint")
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest() if fp \
        else None
    key = digest or f"unknown:{src.get('store') or obj.get('_path') or len(refs)}"
    if key not in refs:
        refs[key] = EncoderRef(f"E{len(refs) + 1}", encoder_label(src), digest)
    store = src.get("store")
    if store and store not in refs[key].stores:
        refs[key].stores.append(store)
    return refs[key]


def _set_text(s: dict[str, Any]) -> str:
    ids = f", ids {s['ids_sha256'][:8]}" if s.get("ids_sha256") else ""
    return f"{s.get('n')} {s.get('split')} images{ids}"


def _check_eval_sets(comparison: Comparison, allow_mixed: bool) -> None:
    """Refuse (or, with ``allow_mixed``, label and warn about) results on different sets."""
    columns = comparison.ours + comparison.fewshot
    sets: list[dict[str, Any]] = []
    for col in columns:
        s = col.eval_set or {}
        match = next((t for t in sets if t["split"] == s.get("split") and t["n"] == s.get("n")
                      and (None in (t["ids_sha256"], s.get("ids_sha256"))
                           or t["ids_sha256"] == s.get("ids_sha256"))), None)
        if match is None:
            match = {"split": s.get("split"), "n": s.get("n"),
                     "ids_sha256": s.get("ids_sha256"), "id": f"T{len(sets) + 1}",
                     "sources": []}
            sets.append(match)
        match["ids_sha256"] = match["ids_sha256"] or s.get("ids_sha256")
        if col.source not in match["sources"]:
            match["sources"].append(col.source)
        col.eval_set_id = match["id"]
    comparison.eval_sets = sets
    unchecked = sorted({c.source for c in columns if not (c.eval_set or {}).get("ids_sha256")})
    if unchecked:
        comparison.warnings.append(
            f"{', '.join(unchecked)} record no test-set image ids (written before cxrembed "
            "recorded them): their test set is checked by split and size only")
    if len(sets) > 1:
        listing = "; ".join(f"{s['id']}: {_set_text(s)} ({', '.join(s['sources'])})"
                            for s in sets)
        if not allow_mixed:
            raise DataError(f"these results were scored on different test sets, so their AUCs "
                            f"are not comparable: {listing}. Compare results of one test set, "
                            "or pass --allow-mixed to put them in one table anyway (each "
                            "column then names its set)")
        comparison.warnings.append(f"mixed test sets (AUCs not comparable across them): "
                                   f"{listing}")
    else:
        for col in columns:
            col.eval_set_id = None
        for s in sets:
            comparison.notes.append(f"ours: {_set_text(s)}")


def _tag_duplicates(items: list[Column] | list[FewShotSeries]) -> None:
    """The same protocol, encoder and set from two results: tell them apart by source."""
    names: dict[str, list[Any]] = {}
    for item in items:
        names.setdefault(item.name, []).append(item)
    for same in names.values():
        if len(same) > 1:
            for k, item in enumerate(same, start=1):
                path = Path(item.source)
                item.tag = (path.parent.name if path.name == "fewshot.json" else path.stem) \
                    or str(k)
            if len({item.tag for item in same}) < len(same):
                for k, item in enumerate(same, start=1):
                    item.tag = f"{item.tag} {k}"
