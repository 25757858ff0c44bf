"""One self-contained HTML report of whatever results a user has (figures as PNG data URIs).

``write_report(paths)`` takes result files and folders (a folder is scanned; see
:mod:`cxrembed.report.inputs` for what is recognised) and renders what is there:

* **Inputs**: every file used, every file passed over (and why), and the sections absent
  for want of an input, with what would produce them;
* **Embedding stores** (``.h5``): size, encoder, embedding health (mean pairwise cosine,
  effective rank, from the store's ``embedding_health`` attribute), marked when collapsed;
* **Domain adaptation** per ``cxrembed adapt`` run folder: loss and val AUC curves from
  ``metrics.jsonl``, settings from ``config.json``, how it ended from ``summary.json``;
* **Per-class test AUC beside the paper's Table 1**: :func:`cxrembed.compare.compare_results`
  on the ``zeroshot``/``evaluate`` JSON and few-shot results (published figures from
  there; results on different test sets are refused unless ``allow_mixed``);
* **Few-shot heads** per ``cxrembed fewshot`` result (its ``fewshot.json``);
* **ROC curves** of the adapted head, from the logits stored in each store that has them;
* from a ``cxrembed demo`` folder also its steps, dataset summary and searches
  (``summary.json``, ``thumbnails.json``).

Every number is read from those files; only the ROC curves are computed here, from the
store's own scores. A file that cannot be parsed is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrembed.errors import DataError
from cxrembed.files import atomic_write_text
from cxrembed.report import figures, sections
from cxrembed.report.inputs import Inputs, find_inputs
from cxrembed.store.health import COLLAPSED_COSINE

log = logging.getLogger(__name__)



@dataclass
class Report:
    """The page written, and what it was made from (the CLI prints these)."""

    path: Path
    found: list[tuple[str, str]]
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_report(paths: str | os.PathLike | Sequence[str | os.PathLike],
                 out: str | os.PathLike | None = None, *, allow_mixed: bool = False) -> Report:
    """Render the results in ``paths`` into ``out`` (default: ``report.html`` in the first
    path when it is a folder, else beside it)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    inputs = find_inputs(paths)
    first = Path(paths[0])
    out = Path(out) if out else (first if first.is_dir() else first.parent) / "report.html"
    stores = [store_facts(p) for p in inputs.stores]
    comparison = None
    if inputs.results:
        from cxrembed.compare import compare_results

        comparison = compare_results(inputs.results, allow_mixed=allow_mixed)
    missing = _missing(inputs, stores)
    demo = inputs.demo or {}
    body = [f"<h1>cxrembed report</h1><div class=sub>"
            f"{sections.esc(demo.get('title', 'results in ' + ', '.join(map(str, paths))))}"
            f" · {sections.esc(demo.get('created', ''))}</div>",
            sections.inputs_section(inputs.found(), inputs.ignored, missing),
            sections.steps_section(demo), sections.dataset_section(demo),
            sections.stores_section(stores)]
    for run in inputs.runs:
        uri = figures.adaptation_curves(run.history) if run.history else None
        body.append(sections.adapt_section(run, uri))
    if comparison is not None:
        body.append(sections.auc_table_section(comparison))
        body += _fewshot_sections(inputs, comparison)
    for result in inputs.results:
        if "operating_points" in result:  # `evaluate --head HEAD_DIR --out`
            cal = result["calibration"]
            uri = figures.reliability_diagram(cal["before"]["reliability"]["pooled"],
                                              cal["after"]["reliability"]["pooled"],
                                              f"reliability on {result['split']}, all classes")
            body.append(sections.calibration_section(result, uri))
    for store in stores:
        if store.get("roc") is not None:
            uri = figures.roc_curves(store["roc"], f"ROC on test: adapted head "
                                                   f"({Path(store['path']).name})")
            body.append(sections.roc_section(store["path"], uri))
    body.append(sections.search_section(demo.get("searches", []), inputs.thumbnails))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>cxrembed report</title>"
            f"<style>{sections.CSS}</style></head><body><main>{''.join(body)}</main></body>"
            "</html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)  # a full disk leaves the previous report as it was
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    warnings = list(comparison.warnings) if comparison else []
    warnings += [f"{s['path']}: {s['health']['why']}" for s in stores
                 if s.get("health") and s["health"]["collapsed"]]
    return Report(out, inputs.found(), inputs.ignored, missing, warnings)


def _fewshot_sections(inputs: Inputs, comparison: Any) -> list[str]:
    from cxrembed.compare import PUBLISHED_FEWSHOT

    labels = {e.id: f"{e.id} {e.label}" for e in comparison.encoders}
    out = []
    for result in inputs.results:
        if result["format"] != "cxrembed.fewshot":
            continue
        encoder = next((labels[s.encoder] for s in comparison.fewshot
                        if s.source == result["_path"] and s.encoder), "")
        seeds = (result.get("config") or {}).get("seeds", "?")
        uri = figures.fewshot_curves(result["summary"], PUBLISHED_FEWSHOT,
                                     f"few-shot heads, mean ± std over {seeds} seeds")
        out.append(sections.fewshot_section(result, encoder, uri))
    return out


def _missing(inputs: Inputs, stores: list[dict[str, Any]]) -> list[str]:
    """The sections absent, each with the input that would produce it."""
    missing = []
    if not inputs.results:
        missing.append("per-class AUC table: no `zeroshot`/`evaluate --out` JSON and no "
                       "`fewshot --out` result")
    elif not any(r["format"] == "cxrembed.fewshot" for r in inputs.results):
        missing.append("few-shot curves: no `cxrembed fewshot --out` result")
    if not inputs.runs:
        missing.append("adaptation curves: no `cxrembed adapt --out` run folder "
                       "(metrics.jsonl)")
    if not stores:
        missing.append("embedding health and ROC curves: no store (.h5 written by "
                       "`cxrembed encode`)")
    elif not any(s.get("roc") is not None for s in stores):
        missing.append("ROC curves: no store holds an adapted head's logits (encode with "
                       "--checkpoint RUN)")
    if inputs.demo is None:
        missing.append("pipeline steps, dataset summary and similarity searches: only a "
                       "`cxrembed demo` folder records them")
    return missing


def store_facts(path: Path) -> dict[str, Any]:
    """Size, encoder, state and health of a store; test labels and head logits for ROC."""
    from cxrembed.compare import encoder_label
    from cxrembed.store import EmbeddingStore

    with EmbeddingStore.open(path, allow_incomplete=True) as store:
        facts = {"path": str(path), "rows": len(store), "complete": store.complete,
                 "encoder": encoder_label({"model": store.attrs.get("model_name"),
                                           "fingerprint": store.fingerprint,
                                           "run": store.run}),
                 "health": embedding_health(store.attrs, path), "roc": None,
                 "skipped": _json_attr(store.attrs, "skipped_images", path) or []}
        test = store.select(split="test")
        if store.has_head and len(test):
            facts["roc"] = _head_scores(store, test)
    return facts


def _head_scores(store: Any, rows: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(class, labels, head logits) of ``rows`` for each head column the store labels,
    rows whose label is unknown left out."""
    logits = store.head_logits(rows)
    lowered = [n.lower() for n in store.label_names]
    out = []
    for j, name in enumerate(store.head_label_names):
        if name.lower() in lowered:
            k = lowered.index(name.lower())
            known = np.asarray(store.label_known[rows, k], dtype=bool)
            out.append((name, np.asarray(store.labels[rows, k])[known], logits[known, j]))
    return out


def embedding_health(attrs: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The store's ``embedding_health`` record (None when it has none), normalised to
    mean_cosine, effective_rank, collapsed and why."""
    raw = _json_attr(attrs, "embedding_health", path)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DataError(f"store {path}: embedding_health is {type(raw).__name__}, "
                        "expected a JSON object")
    mean = raw.get("mean_cosine", raw.get("mean_pairwise_cosine"))
    rank = raw.get("effective_rank")
    collapsed = raw.get("collapsed")
    if collapsed is None:
        # the encode's own verdict wins; a record without one is judged by its threshold
        collapsed = mean is not None and mean > COLLAPSED_COSINE
    why = raw.get("warning") or (f"collapsed: mean pairwise cosine {sections.fmt(mean)}, "
                                 f"effective rank {sections.fmt(rank, 1)}")
    return {"mean_cosine": mean, "effective_rank": rank, "collapsed": bool(collapsed),
            "why": why}


def _json_attr(attrs: dict[str, Any], name: str, path: Path) -> Any:
    """A store attribute holding JSON, decoded (the reader may have decoded it already)."""
    raw = attrs.get(name)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"store {path}: its {name} attribute is not JSON ({exc})") from None
    return raw


def thumbnails(images: dict[str, np.ndarray], size: int = 160) -> dict[str, str]:
    """image id -> PNG data URI of a ``size`` px thumbnail (uint8 gray input)."""
    import base64

    import cv2

    out = {}
    for key, image in images.items():
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", small)
        out[key] = "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()
    return out
