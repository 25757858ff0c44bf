"""Data commands: ``synth``, ``info``, ``cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cxrembed.cli.common import (AllowMissingOpt, CsvOpt, DataArg, SplitSeedOpt, TestListOpt,
                                 TrainValListOpt, ValFractionOpt, ViewOpt, app, console,
                                 load_dataset, print_json)
from cxrembed.labels import LABELS


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the twin into.")] = Path("nih-twin"),
    images: Annotated[int, typer.Option("--images", help="Number of images.")] = 2000,
    size: Annotated[int, typer.Option("--size", help="Side of the square PNGs.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Everything drawn depends on it.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write a synthetic NIH ChestX-ray14 twin (same layout and files, planted findings)."""
    from cxrembed.data import load_nih
    from cxrembed.data.synth import make_twin

    folder = make_twin(out, images=images, size=size, seed=seed)
    _show_summary(load_nih(folder).summary(), json_out)


@app.command()
def info(
    data: DataArg,
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    view: ViewOpt = "all",
    val_fraction: ValFractionOpt = 0.1,
    split_seed: SplitSeedOpt = 7,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show what a data folder holds: images found / missing, patients, positives per split."""
    dataset = load_dataset(data, csv, train_val_list, test_list, view, val_fraction, split_seed,
                           allow_missing=True, keep_missing=True)
    _show_summary(dataset.summary(), json_out)


@app.command()
def cache(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Pixel cache file to write.")] = Path("pixels.h5"),
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    view: ViewOpt = "all",
    val_fraction: ValFractionOpt = 0.1,
    split_seed: SplitSeedOpt = 7,
    allow_missing: AllowMissingOpt = False,
    workers: Annotated[Optional[int], typer.Option("--workers",
                                                   help="Decoding processes (default: all cores).")] = None,
    decoder: Annotated[str, typer.Option("--decoder", help="opencv (fast) or pil.")] = "opencv",
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="Replace a cache of other images.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Decode every image once into a 224x224 uint8 HDF5 cache (resumes if interrupted)."""
    from cxrembed.data.cache import build_pixel_cache

    dataset = load_dataset(data, csv, train_val_list, test_list, view, val_fraction, split_seed,
                           allow_missing)
    path = build_pixel_cache(dataset, out, decoder=decoder, workers=workers, overwrite=overwrite,
                             progress=not no_progress)
    console.print(f"[green]cached[/] {len(dataset):,} images in {path} "
                  f"({path.stat().st_size / 2**30:.2f} GiB)")


def _show_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    console.print(f"[bold]{summary['root']}[/]: {summary['images']:,} images "
                  f"({summary['images_present']:,} on disk), {summary['patients']:,} patients, "
                  f"PA {summary['views']['PA']:,} / AP {summary['views']['AP']:,}")
    if summary["images_missing"]:
        console.print(f"[yellow]{summary['images_missing']:,} images named by the metadata are "
                      f"not on disk[/] (first: {', '.join(summary['missing_examples'])}); "
                      "commands that read pixels need --allow-missing to use the rest")
    table = Table(title="positives per class and split")
    table.add_column("class")
    splits = summary["splits"]
    for split in splits:
        table.add_column(f"{split} ({splits[split]['images']:,} img, "
                         f"{splits[split]['patients']:,} pat)", justify="right")
    for name in LABELS:
        table.add_row(name, *(f"{splits[s]['positives'][name]:,}" for s in splits))
    table.add_row("No Finding", *(f"{splits[s]['no_finding']:,}" for s in splits), style="dim")
    console.print(table)
