"""The report's HTML sections. Each takes what was found and returns an HTML string; every
number shown is read from the inputs (stores, result JSON, run folders)."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2733;
background:#f5f7fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid
#dde3ea;padding-bottom:4px}
.sub{color:#5b6b7d}.card{background:#fff;border-radius:8px;padding:16px;margin:12px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e8ecf1;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef2f6;position:sticky;top:0}
table.auc{font-size:13px}table.auc th,table.auc td{padding:3px 5px}
table.auc th{font-weight:600;vertical-align:bottom}
td.best{font-weight:700;color:#0b6e4f}td.pub,th.pub{color:#6b7785}
td.warn,span.warn{color:#b7410e;font-weight:700}
.card.warn{border-left:4px solid #dd6b20;background:#fffaf3}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.thumb{background:#fff;border-radius:6px;padding:6px;font-size:12px;text-align:center}
.thumb img{width:100%;border-radius:4px;image-rendering:auto}
.kpi{display:inline-block;margin-right:28px}.kpi b{display:block;font-size:22px}
img.fig{max-width:100%}.note{font-size:12px;color:#5b6b7d}
"""


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def esc(x: object) -> str:
    return html.escape(str(x))


def inputs_section(found: list[tuple[str, str]], ignored: list[tuple[Any, str]],
                   missing: list[str]) -> str:
    """What the report was made from, what it passed over, and what it lacks."""
    rows = "".join(f"<tr><td>{esc(kind)}</td><td style='text-align:left'><code>{esc(path)}"
                   "</code></td></tr>" for kind, path in found)
    rows += "".join(f"<tr><td class=sub>ignored</td><td style='text-align:left'><code>"
                    f"{esc(path)}</code> <span class=sub>{esc(why)}</span></td></tr>"
                    for path, why in ignored)
    lacks = "".join(f"<li>{esc(m)}</li>" for m in missing)
    lacks = f"<p><b>Not found</b> (those sections are absent):</p><ul>{lacks}</ul>" if lacks \
        else ""
    return (f"<h2>Inputs</h2><div class=card><table><tr><th>found</th><th style='text-align:"
            f"left'>file</th></tr>{rows}</table>{lacks}</div>")


def steps_section(demo: dict[str, Any]) -> str:
    from cxrembed.demo import format_step_time  # "reused (...)" for a step a rerun skipped

    steps = "".join(f"<tr><td>{esc(s['name'])}</td><td style='white-space:nowrap'>"
                    f"{esc(format_step_time(s))}</td>"
                    f"<td style='text-align:left'><code>{esc(s.get('command', ''))}</code></td>"
                    "</tr>" for s in demo.get("steps", []))
    if not steps:
        return ""
    return (f"<div class=card><p>{esc(demo.get('description', ''))}</p><table><tr><th>step"
            f"</th><th>time</th><th style='text-align:left'>command</th></tr>{steps}</table>"
            "</div>")


def dataset_section(demo: dict[str, Any]) -> str:
    ds = demo.get("dataset")
    if not ds:
        return ""
    names = list(dict.fromkeys(n for v in ds["splits"].values() for n in v["positives"]))
    rows = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(
            f"<td>{ds['splits'][s]['positives'].get(name, 0):,}</td>" for s in ds["splits"])
        + "</tr>" for name in names)
    head = "".join(f"<th>{esc(s)}<br><span class=sub>{v['images']:,} img · "
                   f"{v['patients']:,} pat</span></th>" for s, v in ds["splits"].items())
    sources = ds.get("sources", {})
    dataset = ds.get("dataset", "nih")
    if dataset == "nih":
        how = ("test is the official test list; val is a seeded "
               f"{float(sources.get('val_fraction', 'nan')):.0%} of train_val patients "
               f"(split seed {esc(sources.get('seed', '?'))}).")
    else:
        how = (f"made by the {esc(dataset)} reader (official splits where the collection "
               "ships them, else seeded shares of patients; see <code>cxrembed info</code>). "
               + " ".join(esc(n) for n in ds.get("notes", [])))
    classes = (f"{len(names)} classes of the collection's own"
               + ("" if dataset == "nih" else f" ({esc(dataset)})"))
    return (f"<h2>Dataset</h2><div class=card><div class=sub>{esc(ds['root'])}</div>"
            f"<p><span class=kpi><b>{ds['images']:,}</b>images</span><span class=kpi><b>"
            f"{ds['patients']:,}</b>patients</span><span class=kpi><b>"
            f"{' / '.join(f'{n:,}' for n in ds['views'].values())}</b>"
            f"{esc(' / '.join(ds['views']))}</span></p><p class=note>Splits are "
            f"patient-disjoint: {how}</p>"
            f"<table><tr><th>positives ({classes})</th>{head}</tr>{rows}</table></div>")


def stores_section(stores: list[dict[str, Any]]) -> str:
    """One row per store: size, encoder, and its embedding health (warning when collapsed)."""
    if not stores:
        return ""
    rows, warnings = [], []
    for s in stores:
        health = s.get("health")
        if health is None:
            cells = "<td colspan=2 class=sub>not recorded (store written before cxrembed " \
                    "measured it)</td>"
        else:
            cls = " class=warn" if health["collapsed"] else ""
            cells = f"<td{cls}>{fmt(health['mean_cosine'])}</td><td{cls}>" \
                    f"{fmt(health['effective_rank'], 1)}</td>"
            if health["collapsed"]:
                warnings.append(f"{s['path']}: {health['why']}")
        state = "complete" if s["complete"] else "<span class=warn>incomplete</span>"
        if s.get("skipped"):
            n = len(s["skipped"])
            state += f"<br><span class=warn>{n:,} image{'s' * (n != 1)} skipped</span>"
        rows.append(f"<tr><td style='text-align:left'><code>{esc(s['path'])}</code></td>"
                    f"<td>{s['rows']:,}</td><td>{esc(s['encoder'])}</td><td>{state}</td>"
                    f"{cells}</tr>")
    warn = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    warn = (f"<p><span class=warn>Collapsed embeddings</span>: neighbours and few-shot heads "
            f"on these stores say little.</p><ul class=note>{warn}</ul>") if warn else ""
    return (f"<h2>Embedding stores</h2><div class='card{' warn' if warnings else ''}'>"
            "<div class=scroll><table><tr><th>store</th><th>images</th><th>encoder</th><th>"
            "state</th><th>mean pairwise cosine</th><th>effective rank</th></tr>"
            f"{''.join(rows)}</table></div>{warn}<p class=note>Embedding health as measured "
            "by the encode on a sample of the store's vectors: a mean pairwise cosine near 1 "
            "(or an effective rank near 1) means every image maps to nearly the same "
            "direction.</p></div>")


def adapt_section(run: Any, curves_uri: str | None) -> str:
    """One adaptation run: its curves, settings and how it ended."""
    config = (run.config or {}).get("config", run.config) or {}
    keys = ["model", "pretrained", "unfreeze", "epochs", "batch_size", "lr_encoder",
            "lr_head", "focal_alpha", "focal_gamma", "seed"]
    cfg = " · ".join(f"{k} = {esc(config[k])}" for k in keys if k in config)
    summary = run.summary or {}
    if summary:
        ending = (f"Best val epoch {summary.get('best_epoch')} of {summary.get('epochs_run')} "
                  f"run (at most {config.get('epochs', '?')})"
                  + ("; stopped early: val AUC had stopped improving"
                     if summary.get("stopped_early") else "")
                  + f"; test mean AUC with the best weights {fmt(summary.get('test_mean_auc'))}.")
    else:
        ending = f"Not finished: {len(run.history)} epochs recorded, no summary.json yet."
    figure = (f"<img class=fig src='{curves_uri}' alt='adaptation curves'>" if curves_uri
              else "<p class=sub>no epoch recorded yet</p>")
    return (f"<h2>Domain adaptation <span class=sub>{esc(run.path)}</span></h2><div class=card>"
            f"{figure}<p>{esc(ending)}</p><p class=note>{cfg}</p><p class=note>Epoch selection "
            "and the learning-rate schedule use val AUC only; test is scored once, with the "
            "best weights.</p></div>")


def _header(col: Any) -> str:
    if col.published:
        return f"<th class=pub>{esc(col.method)}<br><span class=sub>published</span></th>"
    shots = f"<br>{col.shots}-shot" if col.shots else ""
    labels = " ".join(x for x in (col.encoder, col.eval_set_id, col.tag) if x)
    return f"<th>{esc(col.method)}{shots}<br><span class=sub>{esc(labels)}</span></th>"


def auc_table_section(comparison: Any) -> str:
    """Table 1's layout: our classes (NIH's 14, or the store's own, any number), published
    columns (beside the classes that match NIH's only), then ours (from compare)."""
    from cxrembed.compare import DESCRIPTIONS

    columns = comparison.columns
    rows = []
    for row in comparison.table1():
        ours = [row[c.name] for c in comparison.ours]
        finite = [v for v in ours if v is not None and np.isfinite(v)]
        best = max(finite) if finite else None
        cells = "".join(f"<td class=pub>{fmt(row[c.name])}</td>" for c in comparison.published)
        cells += "".join(f"<td class='{'best' if v is not None and v == best else ''}'>"
                         f"{fmt(v)}</td>" for v in ours)
        name = "<b>mean</b>" if row["class"] == "Mean" else esc(row["class"])
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    cis = "".join(f"<td class=sub>{'' if not c.ci or c.ci[0] is None else '[' + fmt(c.ci[0])}"
                  f"{'' if not c.ci or c.ci[0] is None else ', ' + fmt(c.ci[1]) + ']'}</td>"
                  for c in comparison.ours)
    rows.append(f"<tr><td class=sub>95% CI, patients</td>"
                f"{'<td></td>' * len(comparison.published)}{cis}</tr>")
    encoders = "".join(f"<li><b>{esc(e.id)}</b> = {esc(e.label)} <span class=sub>"
                       f"{esc(', '.join(e.stores))}</span></li>" for e in comparison.encoders)
    methods = dict.fromkeys(c.method for c in comparison.ours)
    notes = "".join(f"<li><b>{esc(m)}</b>: {esc(DESCRIPTIONS.get(m, ''))}</li>"
                    for m in methods)
    notes += "".join(f"<li>{esc(n)}</li>" for n in comparison.notes)
    warns = "".join(f"<li><span class=warn>{esc(w)}</span></li>" for w in comparison.warnings)
    return (f"<h2>Per-class test AUC beside the paper's Table 1</h2>"
            f"<div class='card{' warn' if warns else ''}'><div class=scroll><table class=auc>"
            f"<tr><th>class</th>{''.join(_header(c) for c in columns)}</tr>{''.join(rows)}"
            f"</table></div><ul class=note>{warns}{encoders}{notes}</ul><p class=note>"
            "Undefined AUCs (a class without positives) show as —. Bold: the highest of our "
            "columns in a row (descriptive, not a selection).</p></div>")


def fewshot_section(result: dict[str, Any], encoder: str, curves_uri: str) -> str:
    """One few-shot result: its curves and a mean ± std table by shots."""
    summary = result["summary"]
    shots = sorted({row["shots"] for row in summary})
    head = "".join(f"<th>{s}-shot</th>" for s in shots)
    body = []
    for name in dict.fromkeys(row["head"] for row in summary):
        cells = {r["shots"]: r["mean_auc"] for r in summary if r["head"] == name}
        body.append(f"<tr><td>{esc(name)}</td>" + "".join(
            f"<td>{fmt(cells[s]['mean'])} ± {fmt(cells[s]['std'])}</td>" if s in cells
            else "<td></td>" for s in shots) + "</tr>")
    return (f"<h2>Few-shot heads <span class=sub>{esc(encoder)} · {esc(result['_path'])}"
            f"</span></h2><div class=card><img class=fig src='{curves_uri}' alt='few-shot "
            f"curves'><div class=scroll><table><tr><th>head</th>{head}</tr>{''.join(body)}"
            "</table></div><p class=note>Shots are drawn from train only; hyper-parameters "
            "are chosen on a few-shot sample of val; test is scored once per (shots, seed)."
            "</p></div>")


def calibration_section(result: dict[str, Any], diagram_uri: str) -> str:
    """A saved head's operating points at its val-fitted thresholds, and its calibration."""
    cal = result["calibration"]

    def cell(m: dict[str, Any] | None) -> str:
        if not m or m.get("value") is None:
            return "<td>n/a</td>"
        ci = "" if m.get("ci_low") is None else f" ({fmt(m['ci_low'], 2)}–{fmt(m['ci_high'], 2)})"
        return f"<td>{fmt(m['value'])}{ci}</td>"

    rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(cell(point.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv"))
        + f"<td>{fmt(cal['before']['ece'].get(name))}</td>"
        f"<td>{fmt(cal['after']['ece'].get(name))}</td></tr>"
        for name, point in result["operating_points"].items())
    source = result.get("source", {})
    return (f"<h2>Operating points and calibration <span class=sub>{esc(source.get('head', ''))}"
            f" · {esc(result['split'])}</span></h2><div class=card><img class=fig "
            f"src='{diagram_uri}' alt='reliability diagram'><div class=scroll><table><tr>"
            "<th>class</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th>"
            "<th>ECE raw</th><th>ECE calibrated</th></tr>" + rows +
            f"<tr><td><b>mean</b></td><td></td><td></td><td></td><td></td>"
            f"<td>{fmt(cal['before']['mean_ece'])}</td><td>{fmt(cal['after']['mean_ece'])}"
            f"</td></tr></table></div><p class=note>Thresholds ({esc(cal.get('threshold_rule'))})"
            f" and calibration ({esc(cal.get('method'))}) were fitted on val, never on this "
            "split; intervals resample patients.</p></div>")


def roc_section(store: str, curves_uri: str) -> str:
    return (f"<h2>ROC curves: adapted head <span class=sub>{esc(store)}</span></h2><div "
            f"class=card><img class=fig src='{curves_uri}' alt='ROC curves'><p class=note>"
            "The protocol drawn is fixed in advance (the adapted model's own head, the paper's "
            "headline model), not the one that happened to score highest on test.</p></div>")


def search_section(searches: list[dict[str, Any]], thumbs: dict[str, str]) -> str:
    if not searches:
        return ""
    blocks = []
    for s in searches:
        def card(image_id: str, caption: str) -> str:
            src = thumbs.get(image_id)
            img = f"<img src='{src}' alt='{esc(image_id)}'>" if src else ""
            return f"<div class=thumb>{img}<div>{caption}</div></div>"

        query = card(s["query"]["image_id"], f"<b>query</b> {esc(s['query']['image_id'])}<br>"
                     f"{esc(', '.join(s['query']['labels']) or 'No Finding')}")
        hits = "".join(card(n["image_id"], f"#{i + 1} sim {n['similarity']:.4f}<br>"
                            f"{esc(', '.join(n['labels']) or 'No Finding')}<br>"
                            f"<span class=sub>patient {n['patient_id']}</span>")
                       for i, n in enumerate(s["neighbours"]))
        blocks.append(f"<div class=card><div class=sub>{esc(s.get('title', ''))}</div>"
                      f"<div class=grid>{query}{hits}</div>{_centring_note(s)}</div>")
    return "<h2>Similarity search</h2>" + "".join(blocks)


def _centring_note(search: dict[str, Any]) -> str:
    """How the similarities were measured: centred vectors or not, and the figure that
    chose it (demo folders written before centring carry no record)."""
    centring = search.get("centring")
    if not centring:
        return ""
    space = "centred vectors (the store's mean subtracted, re-normalised)" if \
        centring.get("centred") else "uncentred unit vectors"
    return (f"<p class=note>Similarity: cosine of {space}; {esc(centring.get('reason', ''))}"
            f" (--centre {esc(centring.get('choice', ''))}).</p>")
