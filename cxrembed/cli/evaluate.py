"""Evaluation commands on a store: ``zeroshot``, ``evaluate``, ``fewshot``, ``compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cxrembed.cli.common import JsonOpt, NoProgressOpt, StoreArg, app, console, print_json
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS

SplitOpt = Annotated[str, typer.Option("--split", help="Split to score (test, val or train).")]
BootstrapOpt = Annotated[int, typer.Option(
    "--bootstrap", help="Patient-level bootstrap resamples for 95% intervals (0: none).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the resamples (and draws).")]
OutJsonOpt = Annotated[Optional[Path], typer.Option(
    "--out", help="Also save the result JSON here.")]
PromptsOpt = Annotated[Optional[Path], typer.Option(
    "--prompts", help="JSON {class: {positive: [...], negative: [...]}}; prompts not in the "
                      "store are encoded with its text tower.")]


def _f(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _show_eval(result: Any, json_out: bool, title: str) -> None:
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title=f"{title}: {result.split} split, {result.n_rows:,} images")
    table.add_column("class")
    table.add_column("AUC", justify="right")
    table.add_column("95% CI (patients)", justify="right")
    for i, name in enumerate(getattr(result, "label_names", LABELS)):
        ci = "" if result.ci is None else f"{_f(result.ci.low[i])} - {_f(result.ci.high[i])}"
        table.add_row(name, _f(result.auc[i]), ci)
    ci = "" if result.ci is None else f"{_f(result.ci.mean_low)} - {_f(result.ci.mean_high)}"
    table.add_row("[bold]mean", f"[bold]{_f(result.mean_auc)}", ci)
    console.print(table)


def _show_operating(result: Any) -> None:
    """Operating points at the stored thresholds, and calibration error before/after."""
    def cell(m: dict) -> str:
        if m.get("value") is None:
            return "n/a"
        ci = "" if m.get("ci_low") is None else f" ({m['ci_low']:.2f}-{m['ci_high']:.2f})"
        return f"{m['value']:.3f}{ci}"

    cal = result.calibration
    table = Table(title=f"at the thresholds fitted on val ({cal['threshold_rule']}); "
                        f"calibration {cal['method']}")
    for col in ("class", "sensitivity", "specificity", "PPV", "NPV", "ECE raw", "ECE cal."):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, point in result.operating.items():
        before, after = cal["before"]["ece"][name], cal["after"]["ece"][name]
        if point.get("threshold") is None:
            table.add_row(name, point.get("note", ""), "", "", "", _f(before, 3), _f(after, 3))
            continue
        table.add_row(name, *(cell(point[k]) for k in ("sensitivity", "specificity", "ppv",
                                                        "npv")), _f(before, 3), _f(after, 3))
    table.add_row("[bold]mean", "", "", "", "", _f(cal["before"]["mean_ece"], 3),
                  _f(cal["after"]["mean_ece"], 3))
    console.print(table)


@app.command()
def zeroshot(
    store: StoreArg,
    prompts: PromptsOpt = None,
    split: SplitOpt = "test",
    bootstrap: BootstrapOpt = 1000,
    seed: SeedOpt = 0,
    out: OutJsonOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Text zero-shot (CheXzero: softmax of positive vs negative prompt similarity)."""
    from cxrembed.fewshot import evaluate_zeroshot

    result = evaluate_zeroshot(store, prompts=prompts, split=split, bootstrap=bootstrap,
                               seed=seed)
    if out is not None:
        result.save(out)
    _show_eval(result, json_out, "text zero-shot")


@app.command()
def evaluate(
    store: StoreArg,
    head: Annotated[str, typer.Option(
        "--head", help="Head to evaluate: adapted (the adapted run's own head, its logits "
                       "stored), or a head folder of `cxrembed fit` (adds its thresholds' "
                       "sensitivity/specificity/PPV/NPV and calibration error).")] = "adapted",
    split: SplitOpt = "test",
    bootstrap: BootstrapOpt = 1000,
    seed: SeedOpt = 0,
    out: OutJsonOpt = None,
    json_out: JsonOpt = False,
    label_map: Annotated[Optional[Path], typer.Option(
        "--label-map", help="CSV of equivalent findings across vocabularies (header: nih,"
                            "chexpert,...); default: the shipped NIH/CheXpert/MIMIC/PadChest "
                            "map. Used when the store's classes are not the head's.")] = None,
) -> None:
    """The adapted model's own head on a split (the figure the paper calls zero-shot); on a
    store of another collection, scored on the classes it shares with the head."""
    from cxrembed.fewshot import evaluate_adapted_head

    if Path(head).is_dir():
        from cxrembed.fewshot.operating import evaluate_saved_head

        result = evaluate_saved_head(store, head, split=split, bootstrap=bootstrap, seed=seed)
        if out is not None:
            result.save(out)
        _show_eval(result, json_out, f"{result.source['kind']} head {head}")
        if not json_out:
            _show_operating(result)
        return
    if head != "adapted":
        raise ConfigError(f"unknown --head {head!r}; `evaluate` scores the stored adapted head "
                          "(--head adapted) or a head folder of `cxrembed fit`; for the "
                          "few-shot sweep use `cxrembed fewshot`")
    result = evaluate_adapted_head(store, split=split, bootstrap=bootstrap, seed=seed,
                                   label_map=label_map)
    if out is not None:
        result.save(out)
    _show_eval(result, json_out, "adapted head")


#: Narrow headers for the terminal: method -> abbreviation (the legend spells them out).
_SHORT = {"CheXzero": "ChXz", "ImCLIP": "ImCL", "CXR-CLIP": "CXRC", "MoCoCLIP": "MoCo",
          "Dalsania 2025": "paper", "zeroshot": "zs", "adapted-head": "adapt", "linear": "lin"}
LEGEND = ("* published; ChXz CheXzero, ImCL ImCLIP, CXRC CXR-CLIP, MoCo MoCoCLIP, zs text "
          "zero-shot, adapt the adapted head, X@K head X at K shots (mean over seeds)")


def _header(column: Any) -> str:
    """A column's narrow header from its fields: 'ChXz*', 'lin@16 E2', 'zs E1 T2 (run-b)'."""
    text = _SHORT.get(column.method, column.method)
    text += f"@{column.shots}" if getattr(column, "shots", None) else ""
    text += "*" if getattr(column, "published", False) else ""
    labels = " ".join(x for x in (column.encoder, column.eval_set_id) if x)
    text += f"\n{labels}" if labels else ""
    return text + (f" ({column.tag})" if column.tag else "")


def _ci_text(cell: dict[str, Any]) -> str:
    return f"[{_f(cell['ci_low'])}, {_f(cell['ci_high'])}]" if cell["ci_low"] is not None else ""


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


@app.command()
def fewshot(
    store: StoreArg,
    shots: Annotated[str, typer.Option(
        "--shots", help="Shots per class, comma-separated.")] = "1,2,4,8,16",
    seeds: Annotated[int, typer.Option("--seeds", help="Draws per shot count.")] = 10,
    heads: Annotated[str, typer.Option(
        "--heads", help="Comma-separated: mlp, linear, knn, tip, zeroshot, adapted."
    )] = "mlp,linear,knn,tip,zeroshot",
    init: Annotated[str, typer.Option(
        "--init", help="mlp start: random, or adapted (the adapted run's head weights)."
    )] = "random",
    no_finding: Annotated[bool, typer.Option(
        "--no-finding/--no-no-finding", help="Add K 'No Finding' images as negatives.")] = True,
    prompts: PromptsOpt = None,
    bootstrap: BootstrapOpt = 1000,
    ci: Annotated[str, typer.Option(
        "--ci", help="pooled (fast, conservative), full (exact, seeds x slower) or none."
    )] = "pooled",
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for JSON, CSV, config and plot.")] = Path("fewshot"),
    device: Annotated[str, typer.Option(
        "--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N: where the mlp "
        "head and the AUC scorer run (the other heads run on the CPU)."
    )] = "auto",
    no_progress: NoProgressOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Few-shot sweep: shots x seeds x heads on the store's vectors, scored on test."""
    from cxrembed.fewshot import describe_shortfall, run_fewshot

    result = run_fewshot(store, out=out, prompts=prompts, progress=not no_progress,
                         shots=_int_list(shots, "--shots"), seeds=seeds,
                         heads=tuple(h.strip() for h in heads.split(",") if h.strip()),
                         init=init, no_finding=no_finding, bootstrap=bootstrap, ci=ci,
                         seed=seed, device=device)
    if json_out:
        print_json({"summary": result.summary, "timing": result.timing, "out": str(out),
                    "shortfall": result.source["shortfall"]})
        return
    for line in describe_shortfall(result.source["shortfall"]):
        console.print(f"[yellow]fewer shots than asked[/] {escape(line)}")
    table = Table(title=f"few-shot mean AUC on {result.source['n_test']:,} test images: "
                        f"mean +- std over {result.config.seeds} seeds [95% CI, patients]")
    table.add_column("head")
    shot_list = sorted({row["shots"] for row in result.summary})
    for k in shot_list:
        table.add_column(f"{k}-shot" if k else "0-shot", justify="right")
    for head in dict.fromkeys(row["head"] for row in result.summary):
        cells = {row["shots"]: row["mean_auc"] for row in result.summary if row["head"] == head}
        table.add_row(head, *[
            "" if k not in cells else
            f"{_f(cells[k]['mean'])} +- {_f(cells[k]['std'], 3)}\n"
            f"[dim]{escape(_ci_text(cells[k]))}[/]"
            for k in shot_list])
    console.print(table)
    console.print(f"[green]saved[/] {out}/fewshot.json, fewshot_auc.csv, fewshot_summary.csv, "
                  f"fewshot_mean_auc.png ({result.timing['total_s']:.1f} s)")


@app.command()
def compare(
    results: Annotated[list[Path], typer.Argument(
        help="Few-shot result folders/JSON and `zeroshot`/`evaluate --out` JSON files.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for comparison JSON/CSV (default: beside the first result)."
    )] = None,
    published: Annotated[Optional[Path], typer.Option(
        "--published", help="CSV of published per-class AUCs (class, CheXzero, ImCLIP, "
        "CXR-CLIP, MoCoCLIP, paper) to use instead of the paper's Table 1 shipped with "
        "cxrembed.")] = None,
    allow_mixed: Annotated[bool, typer.Option(
        "--allow-mixed", help="Put results scored on different test sets in one table "
        "(refused by default: their AUCs are not comparable).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Our protocols beside the paper's Table 1 and few-shot table."""
    from cxrembed.compare import PAPER, compare_results

    first = results[0]
    out = out or (first if first.is_dir() else first.parent)
    comparison = compare_results(results, out=out, published=published,
                                 allow_mixed=allow_mixed)
    if json_out:
        print_json(comparison.to_dict())
        return
    scored_on = ("NIH ChestX-ray14" if comparison.published_classes is None
                 else ", ".join(comparison.datasets))
    table = Table(title=f"{scored_on} test AUC in the layout of the paper's Table 1 "
                        "(* = published)", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("class", no_wrap=True)
    for column in comparison.columns:
        table.add_column(escape(_header(column)), justify="right", min_width=5)
    for row in comparison.table1():
        table.add_row(row["class"], *[_f(row[c.name], 3) for c in comparison.columns])
    console.print(table)
    console.print(f"[dim]{LEGEND}[/]")
    for ref in comparison.encoders:
        stores = f" ({', '.join(ref.stores)})" if ref.stores else ""
        console.print(f"[dim]{ref.id} = {escape(ref.label)}{escape(stores)}[/]")
    for message in comparison.warnings:
        console.print(f"[yellow]warning:[/] {escape(message)}")
    for note in comparison.notes:
        if note.startswith("classes:"):  # which published cells sit beside our classes
            console.print(f"[dim]{escape(note)}[/]")
    few = comparison.fewshot_table()
    table = Table(title="Few-shot mean AUC (* paper: one draw, one seed; ours: mean +- std "
                        "over seeds)", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("shots", justify="right")
    table.add_column("paper*", justify="right", min_width=6)
    for series in comparison.fewshot:
        table.add_column(escape(_header(series)), justify="right", min_width=6)
    for row in few:
        cells = [row[s.name] for s in comparison.fewshot]
        table.add_row(str(row["shots"]), _f(row[f"{PAPER} (published)"]), *[
            "" if v is None else f"{_f(v['mean'])}±{_f(v['std'], 3)}" for v in cells])
    console.print(table)
    console.print(f"[green]saved[/] {out}/comparison.json, comparison_table1.csv, "
                  "comparison_fewshot.csv")
