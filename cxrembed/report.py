"""One self-contained HTML report of a run folder (figures embedded as PNG data URIs).

``write_report(run_dir)`` reads what the pipeline wrote into ``run_dir`` (see
:mod:`cxrembed.demo` for the layout: ``summary.json``, the adaptation run's
``metrics.jsonl``, the few-shot ``results.json``, search results) and writes
``run_dir/report.html``. Every number in the report is read from those files; nothing is
recomputed here except the ROC curves, which come from the store's own scores.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from cxrembed.errors import CxrembedError
from cxrembed.labels import LABELS

log = logging.getLogger(__name__)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2733;
background:#f5f7fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid
#dde3ea;padding-bottom:4px}
.sub{color:#5b6b7d}.card{background:#fff;border-radius:8px;padding:16px;margin:12px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e8ecf1;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef2f6;position:sticky;top:0}
td.best{font-weight:700;color:#0b6e4f}td.pub{color:#6b7785}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.thumb{background:#fff;border-radius:6px;padding:6px;font-size:12px;text-align:center}
.thumb img{width:100%;border-radius:4px;image-rendering:auto}
.kpi{display:inline-block;margin-right:28px}.kpi b{display:block;font-size:22px}
img.fig{max-width:100%}.note{font-size:12px;color:#5b6b7d}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img_uri(gray: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", gray)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def _esc(x: object) -> str:
    return html.escape(str(x))


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


# ---------------------------------------------------------------------------------------
# Sections


def _dataset_section(summary: dict) -> str:
    ds = summary.get("dataset")
    if not ds:
        return ""
    rows = "".join(
        f"<tr><td>{_esc(name)}</td>" + "".join(
            f"<td>{ds['splits'][s]['positives'][name]:,}</td>" for s in ds["splits"]) + "</tr>"
        for name in LABELS)
    head = "".join(f"<th>{_esc(s)}<br><span class=sub>{v['images']:,} img · "
                   f"{v['patients']:,} pat</span></th>" for s, v in ds["splits"].items())
    return (f"<h2>Dataset</h2><div class=card><div class=sub>{_esc(ds['root'])}</div>"
            f"<p><span class=kpi><b>{ds['images']:,}</b>images</span><span class=kpi><b>"
            f"{ds['patients']:,}</b>patients</span><span class=kpi><b>{ds['views']['PA']:,} / "
            f"{ds['views']['AP']:,}</b>PA / AP</span></p><p class=note>Splits are "
            "patient-disjoint: test is the official test list; val is a seeded "
            f"{float(ds['sources'].get('val_fraction', 'nan')):.0%} of train_val patients "
            f"(split seed {_esc(ds['sources'].get('seed', '?'))}).</p>"
            f"<table><tr><th>positives</th>{head}</tr>{rows}</table></div>")


def _adapt_section(history: list[dict], config: dict | None) -> str:
    if not history:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in history if "epoch" in h]  # the last line is the test record
    if not history:
        return ""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="#2b6cb0")
    ax1.set(xlabel="epoch", ylabel="train loss (focal BCE)", title="training loss")
    per_class = np.array([[np.nan if h["val_auc"].get(c) is None else h["val_auc"][c]
                           for c in LABELS] for h in history], dtype=float)
    if per_class.size:
        for k in range(per_class.shape[1]):
            ax2.plot(epochs, per_class[:, k], color="#a0aec0", lw=0.8)
    ax2.plot(epochs, [h["val_mean_auc"] for h in history], "o-", color="#c05621", lw=2.5,
             label="mean (defined classes)")
    ax2.set(xlabel="epoch", ylabel="val AUC", title="validation AUC per class (grey) and mean")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cfg = ""
    config = (config or {}).get("config", config)
    if config:
        keys = ["model", "pretrained", "unfreeze", "epochs", "batch_size", "lr_encoder",
                "lr_head", "focal_alpha", "focal_gamma", "seed"]
        cfg = "<p class=note>" + " · ".join(f"{k} = {_esc(config[k])}" for k in keys
                                            if k in config) + "</p>"
    return (f"<h2>Domain adaptation</h2><div class=card><img class=fig src='{_png(fig)}' "
            f"alt='adaptation curves'>{cfg}<p class=note>Epoch selection and the learning-rate "
            "schedule use val AUC only; test is scored once, with the best weights.</p></div>")


def _auc_table_section(protocols: dict[str, dict], published: dict[str, dict]) -> str:
    if not protocols:
        return ""
    names = list(protocols)
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    head += "".join(f"<th class=pub>{_esc(n)}<br><span class=sub>published</span></th>"
                    for n in published)
    rows = []
    for k, cls in enumerate(LABELS):
        vals = [protocols[n]["per_class"][k] for n in names]
        finite = [v for v in vals if v is not None and np.isfinite(v)]
        best = max(finite) if finite else None
        cells = "".join(f"<td class='{'best' if v is not None and v == best else ''}'>"
                        f"{_fmt(v)}</td>" for v in vals)
        cells += "".join(f"<td class=pub>{_fmt(published[p].get('per_class', {}).get(cls))}"
                         "</td>" for p in published)
        rows.append(f"<tr><td>{_esc(cls)}</td>{cells}</tr>")
    levels = {p.get("ci_level") for p in protocols.values() if p.get("ci")}
    level = f"{levels.pop():.0%}" if len(levels) == 1 else "see each protocol's JSON for the"
    means = "".join(
        f"<td><b>{_fmt(protocols[n]['mean'])}</b>"
        + (f"<br><span class=sub>[{_fmt(protocols[n]['ci'][0])}, {_fmt(protocols[n]['ci'][1])}]"
           "</span>" if protocols[n].get("ci") else "") + "</td>" for n in names)
    means += "".join(f"<td class=pub><b>{_fmt(published[p].get('mean'))}</b></td>"
                     for p in published)
    notes = "".join(f"<li><b>{_esc(n)}</b>: {_esc(protocols[n].get('description', ''))}</li>"
                    for n in names)
    return (f"<h2>Per-class test AUC beside the paper's Table 1</h2><div class=card>"
            f"<table><tr><th>class</th>{head}</tr>{''.join(rows)}<tr><td><b>mean</b>"
            f"<br><span class=sub>bootstrap {level} CI, by patient</span></td>{means}</tr>"
            "</table>"
            f"<ul class=note>{notes}</ul><p class=note>Published columns are the figures "
            "printed in the paper's Table 1 (NIH ChestX-ray14 official test list, real "
            "images; its four baselines quoted from Bhardwaj et al.). Ours are from this "
            "run's data. Undefined AUCs (a class without positives) show as —. Bold: the "
            "highest of our columns in a row (descriptive, not a selection).</p></div>")


def _fewshot_section(fewshot: dict | None) -> str:
    if not fewshot or not fewshot.get("curves"):
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curves = fewshot["curves"]
    trained = {h: c for h, c in curves.items() if c["shots"][-1] > 0}
    free = {h: c for h, c in curves.items() if c["shots"][-1] == 0}
    for head, curve in trained.items():
        shots = np.array(curve["shots"], float)
        mean, std = np.array(curve["mean"], float), np.array(curve["std"], float)
        ax.plot(shots, mean, "o-", label=head)
        ax.fill_between(shots, mean - std, mean + std, alpha=0.2)
    all_shots = sorted({s for c in trained.values() for s in c["shots"]}) or [1]
    for head, curve in free.items():  # training-free: one value, drawn across
        label = ("adapted head (full supervision)" if head == "adapted"
                 else f"{head} (0-shot)")
        ax.hlines(curve["mean"][0], all_shots[0], all_shots[-1], linestyles=":",
                  colors="#805ad5", label=label)
    if fewshot.get("paper"):
        ps, pv = zip(*sorted((int(k), v) for k, v in fewshot["paper"].items() if int(k) > 0))
        ax.plot(ps, pv, "k--", lw=1, label="paper (published)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(s) for s in all_shots])
    ax.set(xlabel="shots per class", ylabel="mean test AUC (14 classes)",
           title=f"few-shot heads, mean ± std over {fewshot.get('seeds', '?')} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    columns = ([0] if free else []) + all_shots
    head = "".join(f"<th>{s}-shot</th>" for s in columns)

    def cells(curve: dict) -> str:
        by_shot = dict(zip(curve["shots"], zip(curve["mean"], curve["std"])))
        return "".join(f"<td>{_fmt(by_shot[s][0])} ± {_fmt(by_shot[s][1])}</td>"
                       if s in by_shot else "<td></td>" for s in columns)

    table_rows = "".join(f"<tr><td>{_esc(h)}</td>{cells(c)}</tr>" for h, c in curves.items())
    return (f"<h2>Few-shot heads on cached vectors</h2><div class=card><img class=fig "
            f"src='{_png(fig)}' alt='few-shot curves'><table><tr><th>head</th>{head}</tr>"
            f"{table_rows}</table><p class=note>Shots are drawn from train only; hyper-parameters "
            "are chosen on a few-shot sample of val; test is scored once per (shots, seed).</p>"
            "</div>")


def _roc_section(roc: dict | None) -> str:
    if not roc:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    labels, scores = np.asarray(roc["labels"]), np.asarray(roc["scores"])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab20")
    for k, cls in enumerate(LABELS):
        y = labels[:, k]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores[:, k])
            ax.plot(fpr, tpr, color=cmap(k), lw=1.2, label=cls)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC on test: {roc['protocol']}")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return (f"<h2>ROC curves: {_esc(roc['protocol'])}</h2><div class=card><img class=fig "
            f"src='{_png(fig)}' alt='ROC curves'><p class=note>The protocol drawn here is fixed "
            "before scoring (the paper's headline model), not the one that happened to score "
            "highest on test: picking by test AUC would bias the picture upward.</p></div>")


def _search_section(searches: list[dict], thumbs: dict[str, str]) -> str:
    if not searches:
        return ""
    blocks = []
    for s in searches:
        def card(image_id: str, caption: str) -> str:
            src = thumbs.get(image_id)
            img = f"<img src='{src}' alt='{_esc(image_id)}'>" if src else ""
            return f"<div class=thumb>{img}<div>{caption}</div></div>"

        query = card(s["query"]["image_id"], f"<b>query</b> {_esc(s['query']['image_id'])}<br>"
                     f"{_esc(', '.join(s['query']['labels']) or 'No Finding')}")
        hits = "".join(card(n["image_id"], f"#{i + 1} sim {n['similarity']:.4f}<br>"
                            f"{_esc(', '.join(n['labels']) or 'No Finding')}<br>"
                            f"<span class=sub>patient {n['patient_id']}</span>")
                       for i, n in enumerate(s["neighbours"]))
        blocks.append(f"<div class=card><div class=sub>{_esc(s.get('title', ''))}</div>"
                      f"<div class=grid>{query}{hits}</div></div>")
    return "<h2>Similarity search</h2>" + "".join(blocks)


# ---------------------------------------------------------------------------------------


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) from the run's own JSON files."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        raise CxrembedError(f"{run_dir} has no readable summary.json; point `cxrembed report` "
                            "at a folder written by `cxrembed demo` (or the same layout)")
    history = _read_jsonl(run_dir / summary["adapt_run"] / "metrics.jsonl") if summary.get(
        "adapt_run") else []
    config = _read_json(run_dir / summary["adapt_run"] / "config.json") if summary.get(
        "adapt_run") else None
    thumbs = {}
    if summary.get("thumbnails"):
        thumbs = _read_json(run_dir / summary["thumbnails"]) or {}
    roc = _read_json(run_dir / summary["roc"]) if summary.get("roc") else None
    fewshot = _read_json(run_dir / summary["fewshot_curves"]) if summary.get(
        "fewshot_curves") else None
    steps = "".join(f"<tr><td>{_esc(s['name'])}</td><td>{s['seconds']:.1f} s</td>"
                    f"<td style='text-align:left'><code>{_esc(s.get('command', ''))}</code></td>"
                    "</tr>" for s in summary.get("steps", []))
    body = "".join([
        f"<h1>cxrembed report</h1><div class=sub>{_esc(summary.get('title', run_dir.name))} · "
        f"{_esc(summary.get('created', ''))} · cxrembed {_esc(summary.get('version', ''))}</div>",
        f"<div class=card><p>{_esc(summary.get('description', ''))}</p>"
        f"<table><tr><th>step</th><th>time</th><th style='text-align:left'>command</th></tr>"
        f"{steps}</table></div>" if steps else "",
        _dataset_section(summary),
        _adapt_section(history, config),
        _auc_table_section(summary.get("protocols", {}), summary.get("published", {})),
        _fewshot_section(fewshot),
        _roc_section(roc),
        _search_section(summary.get("searches", []), thumbs),
    ])
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>cxrembed report</title>"
            f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>")
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def thumbnails(images: dict[str, np.ndarray], size: int = 160) -> dict[str, str]:
    """image id -> PNG data URI of a ``size`` px thumbnail (uint8 gray input)."""
    import cv2

    return {k: _img_uri(cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA))
            for k, v in images.items()}
