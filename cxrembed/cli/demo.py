"""``cxrembed demo`` and ``cxrembed report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cxrembed.cli.common import (AllowMissingOpt, CsvOpt, DeviceOpt, NoProgressOpt,
                                 ReaderOptions, SplitSeedOpt, TestListOpt, TrainValListOpt,
                                 ViewOpt, app, console, reader_options)


@app.command()
@reader_options(exclude=("images",))  # demo's --images is the twin's size
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")]
    = Path("cxrembed-demo"),
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="A data folder: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest, "
        "class folders, or a labelled CSV with --dataset csv (default: a synthetic NIH "
        "twin).")] = None,
    model: Annotated[str, typer.Option("--model", help="open_clip architecture.")] = "cxr-tiny",
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="open_clip tag, local weights file, or none.")] = "none",
    images: Annotated[int, typer.Option("--images", help="Synthetic twin size.")] = 2000,
    size: Annotated[int, typer.Option("--size", help="Synthetic twin image side (px).")] = 128,
    epochs: Annotated[int, typer.Option("--epochs", help="Adaptation epochs.")] = 10,
    seeds: Annotated[int, typer.Option("--seeds", help="Few-shot draws per shot count.")] = 10,
    shots: Annotated[str, typer.Option(
        "--shots", help="Few-shot shots per class, comma-separated.")] = "1,2,4,8,16",
    device: DeviceOpt = "auto",
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    view: ViewOpt = "all",
    val_fraction: Annotated[Optional[float], typer.Option(
        "--val-fraction", help="Share of train_val patients held out for val (default: 0.25 "
        "on the synthetic twin, whose val split is small; 0.1 on --data).")] = None,
    split_seed: SplitSeedOpt = 7,
    allow_missing: AllowMissingOpt = False,
    no_progress: NoProgressOpt = False,
    source: ReaderOptions = None,
) -> None:
    """Run the whole method end to end and write an HTML report (synthetic data by default;
    --data: any collection, with its own classes)."""
    from cxrembed.cli.evaluate import _int_list
    from cxrembed.demo import DemoConfig, check_config, format_step_time, run_demo

    config = DemoConfig(data=str(data) if data else None, model=model, pretrained=pretrained,
                        images=images, size=size, epochs=epochs, seeds=seeds, device=device,
                        shots=_int_list(shots, "--shots"), csv=str(csv) if csv else None,
                        train_val_list=str(train_val_list) if train_val_list else None,
                        test_list=str(test_list) if test_list else None, view=view,
                        val_fraction=val_fraction, split_seed=split_seed,
                        allow_missing=allow_missing, data_options=_given(source))
    check_config(config)
    result = run_demo(out, config, progress=not no_progress,
                      announce=lambda line: console.print(f"[bold cyan]{line}[/]",
                                                          highlight=False))
    table = Table(title=f"test AUC by protocol ({'synthetic twin' if config.synthetic else data})")
    table.add_column("protocol")
    table.add_column("mean AUC", justify="right")
    table.add_column("95% CI (by patient)", justify="right")
    for name, p in result.protocols.items():
        ci = f"[{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" if p.get("ci") else "—"
        table.add_row(name, f"{p['mean']:.3f}" if p["mean"] is not None else "—", ci)
    console.print(table)
    steps = ", ".join(f"{s['name']} {format_step_time(s)}" for s in result.steps)
    console.print(f"ran: {steps}")
    console.print(f"[green]done in {result.seconds:.0f} s.[/] Report: [bold]{result.report}"
                  f"[/]  (everything else is in {result.out}/)")


def _given(source: ReaderOptions | None) -> dict:
    """The reader options set to other than their defaults (paths as text)."""
    import dataclasses

    defaults = dataclasses.asdict(ReaderOptions())
    return {k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(source or ReaderOptions()).items()
            if v != defaults[k]}


@app.command()
def report(
    inputs: Annotated[list[Path], typer.Argument(
        help="Results to show: few-shot folders, zeroshot/evaluate JSON, adapt run folders, "
             "stores (.h5), a demo folder; folders are scanned.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="HTML file to write (default: report.html in the first folder given, "
                      "or beside the first file).")] = None,
    allow_mixed: Annotated[bool, typer.Option(
        "--allow-mixed", help="Show results scored on different test sets in one table "
                              "(refused by default: their AUCs are not comparable).")] = False,
) -> None:
    """Write one self-contained HTML report of the results given."""
    from rich.markup import escape

    from cxrembed.report import write_report

    result = write_report(inputs, out, allow_mixed=allow_mixed)
    for kind, path in result.found:
        console.print(f"found: {kind} [dim]{escape(path)}[/]", highlight=False)
    for path, why in result.ignored:
        console.print(f"[dim]ignored: {escape(str(path))} ({escape(why)})[/]", highlight=False)
    for line in result.missing:
        console.print(f"[yellow]not found:[/] {escape(line)}", highlight=False)
    for line in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    size = result.path.stat().st_size / 1e6
    console.print(f"[green]wrote[/] {escape(str(result.path))} ({size:.1f} MB)", highlight=False)
