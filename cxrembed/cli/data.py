"""Data commands: ``synth``, ``info``, ``cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cxrembed.cli.common import (AllowMissingOpt, CsvOpt, DataArg, NoProgressOpt, ReaderOptions,
                                 SplitSeedOpt, TestListOpt, TrainValListOpt, ValFractionOpt,
                                 ViewOpt, app, console, load_dataset, print_json, reader_options)

#: How the generic CSV twin is read (its column names), for the summary ``synth`` prints.
_CSV_TWIN = ReaderOptions(dataset="csv", image_col="image", label_col="findings",
                          patient_col="patient_id", split_col="split", view_col="view",
                          age_col="age", sex_col="sex")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the twin into.")] = Path("nih-twin"),
    images: Annotated[int, typer.Option("--images", help="Number of images.")] = 2000,
    size: Annotated[int, typer.Option("--size", help="Side of the square PNGs.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Everything drawn depends on it.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help=(
        "Layout to write: nih, chexpert, mimic, padchest, csv or folders."))] = "nih",
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write a synthetic twin in a real layout (NIH by default) with planted findings."""
    from cxrembed.data.synth_formats import make_format_twin

    folder = make_format_twin(out, fmt, images=images, size=size, seed=seed)
    source = _CSV_TWIN if fmt == "csv" else ReaderOptions(dataset=fmt)
    dataset = load_dataset(folder, None, None, None, "all", 0.1, 7, False, source=source)
    _show_summary(dataset.summary(), json_out)


@app.command()
@reader_options
def info(
    data: DataArg,
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    view: ViewOpt = "all",
    val_fraction: ValFractionOpt = 0.1,
    split_seed: SplitSeedOpt = 7,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    source: ReaderOptions = None,
) -> None:
    """Show what a data folder holds: images found / missing, patients, positives per split."""
    dataset = load_dataset(data, csv, train_val_list, test_list, view, val_fraction, split_seed,
                           allow_missing=True, keep_missing=True, source=source)
    _show_summary(dataset.summary(), json_out)


@app.command()
@reader_options
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
                                                   help="Decoding processes (default: all cores; under torchrun, the node's cores shared by its processes).")] = None,
    decoder: Annotated[str, typer.Option("--decoder", help="opencv (fast) or pil.")] = "opencv",
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="Replace a cache of other images.")] = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Record unreadable images (listed here and in the cache) instead "
        "of stopping at the first.")] = False,
    join: Annotated[str, typer.Option("--join", help=(
        "Under torchrun: how rank 0 joins the ranks' shards, virtual (an HDF5 virtual "
        "dataset; the shards stay beside the cache) or copy (one self-contained file)."))
    ] = "virtual",
    no_progress: NoProgressOpt = False,
    source: ReaderOptions = None,
) -> None:
    """Decode every image once into a 224x224 uint8 HDF5 cache (resumes if interrupted).

    Under torchrun each process decodes a contiguous share into a shard and rank 0 joins
    them (`torchrun --nnodes M --nproc_per_node 1 ... -m cxrembed cache ...`)."""
    from cxrembed.data.cache import PixelCache, build_pixel_cache
    from cxrembed.distributed import launch

    dataset = load_dataset(data, csv, train_val_list, test_list, view, val_fraction, split_seed,
                           allow_missing, source=source)
    path = build_pixel_cache(dataset, out, decoder=decoder, workers=workers, overwrite=overwrite,
                             progress=not no_progress, skip_bad=skip_bad, join=join)
    if not launch().main:  # under torchrun, rank 0 alone holds the joined cache and prints
        return
    cached = PixelCache(path)
    skipped = cached.skipped
    cached.close()
    for image_id, reason in skipped.items():
        console.print(f"[yellow]skipped[/] {image_id}: {reason}", highlight=False,
                      soft_wrap=True)
    # The pixels' size, not the file's: a cache joined as a virtual dataset is a small file
    # over its shards, and a reused cache may hold more images than the dataset.
    console.print(f"[green]cached[/] {len(dataset):,} images in {path} "
                  f"({_size(len(cached) * cached.size ** 2)} of pixels)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _show_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    views = " / ".join(f"{v} {c:,}" for v, c in summary["views"].items())
    console.print(f"[bold]{summary['root']}[/] ({summary.get('dataset', 'nih')}): "
                  f"{summary['images']:,} images ({summary['images_present']:,} on disk), "
                  f"{summary['patients']:,} patients, {views}")
    for note in summary.get("notes", []):
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if summary["images_missing"]:
        console.print(f"[yellow]{summary['images_missing']:,} images named by the metadata are "
                      f"not on disk[/] (first: {', '.join(summary['missing_examples'])}); "
                      "commands that read pixels need --allow-missing to use the rest")
    splits = summary["splits"]
    partial = bool(summary["images_missing"])
    unknown = any(sum(splits[s].get("unknown", {}).values()) for s in splits)

    def both(disk: int, meta: int) -> str:
        # On a partial download both matter: what the metadata describes, and what is usable.
        return f"{disk:,} / {meta:,}" if partial else f"{meta:,}"

    table = Table(title="positives per class and split"
                  + (": on disk / in the metadata" if partial else "")
                  + (" (unknown labels in brackets)" if unknown else ""))
    table.add_column("class")
    for split, counts in splits.items():
        disk = counts["on_disk"]
        table.add_column(f"{split}\n{both(disk['images'], counts['images'])} img\n"
                         f"{both(disk['patients'], counts['patients'])} pat", justify="right")
    for name in summary["label_names"]:
        cells = []
        for counts in splits.values():
            cell = both(counts["on_disk"]["positives"][name], counts["positives"][name])
            missing = counts.get("unknown", {}).get(name, 0)
            cells.append(cell + (f" [dim]({missing:,})[/]" if missing else ""))
        table.add_row(name, *cells)
    table.add_row("No Finding", *(both(c["on_disk"]["no_finding"], c["no_finding"])
                                  for c in splits.values()), style="dim")
    console.print(table)
