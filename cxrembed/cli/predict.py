"""Heads you keep and new images scored: ``fit`` and ``predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cxrembed.cli.common import DeviceOpt, app, console, print_json
from cxrembed.errors import ConfigError

RESEARCH_NOTICE = ("Research use only: cxrembed is not a medical device and its outputs "
                   "must not be used for clinical decisions.")


def _options(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--options {text!r} is not JSON ({exc}); e.g. "
                          "'{\"Cs\": [0.1, 1, 10]}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--options must be a JSON object, got {text!r}")
    return value


@app.command()
def fit(
    store: Annotated[Path, typer.Argument(help="Embedding store (.h5) with train and val rows.")],
    head: Annotated[str, typer.Option(
        "--head", help="linear | mlp | knn | tip | zeroshot | adapted (the adapted run's "
                       "own head).")],
    out: Annotated[Path, typer.Option("--out", help="Head folder to write (head.json + "
                                                    "head.npz).")],
    shots: Annotated[Optional[int], typer.Option(
        "--shots", help="K shots per class from train (the sweep's draw).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Which draw (the sweep's seed).")] = 0,
    all_rows: Annotated[bool, typer.Option("--all", help="Fit on every train row.")] = False,
    calibration: Annotated[str, typer.Option(
        "--calibration", help="platt | isotonic | none, fitted per class on val.")] = "platt",
    threshold: Annotated[str, typer.Option(
        "--threshold", help="Operating point per class, chosen on val: youden | "
                            "sensitivity=0.9 | specificity=0.9 | f1.")] = "youden",
    options: Annotated[Optional[str], typer.Option(
        "--options", help="The head's options as JSON, e.g. '{\"k\": 20}'.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Prompts JSON for zeroshot/tip (else the store's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a head in --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """Fit one head on the store's train split, calibrate it on val, save it."""
    from cxrembed.fewshot.fit import fit_head

    saved = fit_head(store, head, shots=shots, seed=seed, all_rows=all_rows,
                     calibration=calibration, threshold=threshold, options=_options(options),
                     prompts=prompts, out=out, overwrite=overwrite)
    if json_out:
        print_json(saved.card)
        return
    val = saved.card["val_metrics"]
    table = Table(title=f"{head} head -> {out} (val: {val['n']:,} images, mean AUC "
                        f"{val['mean_auc'] if val['mean_auc'] is None else round(val['mean_auc'], 4)})")
    for col in ("class", "val AUC", f"threshold ({threshold})", "ECE raw", "note"):
        table.add_column(col)
    for name in saved.label_names:
        cal = saved.calibration[name]
        auc, ece = val["auc"][name], val["ece_uncalibrated"][name]
        table.add_row(name, "n/a" if auc is None else f"{auc:.4f}",
                      f"{cal.threshold:.4g}", "n/a" if ece is None else f"{ece:.3f}", cal.note)
    console.print(table)


@app.command(help="Score new images (PNG, JPEG, DICOM) with a saved head: calibrated "
                  "probability and positive/negative per class, resumable.\n\n"
                  + RESEARCH_NOTICE)
def predict(
    inputs: Annotated[list[Path], typer.Argument(
        help="Image files, folders (searched recursively) or text files of paths.")],
    head: Annotated[Path, typer.Option(
        "--head", help="Head folder (`cxrembed fit`) or an adapt run folder.")],
    out: Annotated[Path, typer.Option(
        "--out", help="preds.csv or preds.json; a rerun skips images already in it.")],
    store: Annotated[Optional[Path], typer.Option(
        "--store", help="Store of labelled images: list each image's nearest ones.")] = None,
    k: Annotated[int, typer.Option("-k", help="Nearest stored images per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Threads decoding images.")] = 2,
    device: DeviceOpt = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a summary as JSON.")] = False,
) -> None:
    from cxrembed.predict import predict_images

    result = predict_images(inputs, head, out, store=store, k=k, batch_size=batch_size,
                            workers=workers, device=device, progress=not no_progress)
    summary = {"out": str(result.out), "images": result.total, "written": result.written,
               "already_done": result.skipped, "unreadable": result.errors,
               "warnings": result.warnings, "notice": RESEARCH_NOTICE}
    if json_out:
        print_json(summary)
        return
    console.print(f"{result.written:,} images scored into {result.out} "
                  f"({result.skipped:,} already there, {result.errors:,} unreadable: see "
                  "their 'error' column)")
    console.print(f"[dim]{RESEARCH_NOTICE}[/]")
