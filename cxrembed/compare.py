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

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from cxrembed.compare_classes import dataset_of, match_published
from cxrembed.compare_table import Column, Comparison, EncoderRef, FewShotSeries
from cxrembed.errors import DataError
from cxrembed.fewshot.results import load_result
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
