"""``cxrembed adapt DATA --out RUN``: domain adaptation of CLIP (see cxrembed.adapt).

Every field of :class:`cxrembed.adapt.AdaptConfig` is an option (``lr_head`` ->
``--lr-head``; booleans as ``--augment/--no-augment``). The options are generated from
the dataclass so that the two cannot drift apart; a value given on the command line
overrides one from ``--config FILE`` (JSON), which overrides the paper's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cxrembed.adapt.config import AdaptConfig
from cxrembed.adapt.result import AdaptStart
from cxrembed.cli.common import (CsvOpt, DataArg, JsonOpt, NoProgressOpt, ReaderOptions,
                                 TestListOpt, TrainValListOpt, app, console, print_json,
                                 reader_options)
from cxrembed.labels import LABELS

_HINTS = typing.get_type_hints(AdaptConfig)
_FIELDS = [f for f in dataclasses.fields(AdaptConfig)]


def _option_type(name: str) -> Any:
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return Optional[args[0] if args else hint]


def _config_options() -> list[inspect.Parameter]:
    params = []
    for f in _FIELDS:
        flag = "--" + f.name.replace("_", "-")
        base = typing.get_args(_option_type(f.name))[0]
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        help_text = f.metadata.get("help", "") + (
            f" (default: {f.default})" if f.default is not None else "")
        option = typer.Option(*decls, help=help_text, show_default=False,
                              rich_help_panel="Run configuration")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[_option_type(f.name), option]))
    return params


def adapt(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Run folder to write (or resume).")],
    pixel_cache: Annotated[Optional[Path], typer.Option(
        "--pixel-cache", help="Pixel cache of DATA (`cxrembed cache`): no PNG decoding per "
        "epoch.")] = None,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON file of run configuration values (flags override it).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (or show "
                                         "its result when finished).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out.")
                         ] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu ... "
                                                  "(default: CUDA when available).")] = None,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow a --pretrained file with pickled Python objects (runs "
        "code from it: only for files you trust).")] = False,
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    no_progress: NoProgressOpt = False,
    json_out: JsonOpt = False,
    source: ReaderOptions = None,
    **config_values: Any,
) -> None:
    """Adapt CLIP to chest X-rays: top visual blocks + MLP head, selected on val, test once.

    DATA may be any collection (--dataset); the head has one output per class of it, and
    unknown labels (--uncertain ignore) count in neither the loss nor val/test AUC."""
    from cxrembed.adapt import adapt as run_adapt
    from cxrembed.distributed import launch

    main_process = launch().main  # under torchrun, rank 0 alone prints

    given = {k: v for k, v in config_values.items() if v is not None}
    config = (AdaptConfig.from_file(config_file, given) if config_file is not None
              else AdaptConfig.from_dict(given))

    def started(info: AdaptStart) -> None:
        if not json_out and main_process:
            resumed = (f"; resuming after epoch {info.epochs_done} of {info.epochs}"
                       if info.epochs_done else "")
            console.print(f"[bold]{info.model}[/] ({info.weights}) on {info.device}: "
                          f"[cyan]{info.trainable_params:,}[/] trainable parameters "
                          f"(top {info.unfreeze} blocks + ln_post + proj + head); "
                          f"{info.train:,} train / {info.val:,} val / {info.test:,} "
                          f"test images; {info.workers} reading processes{resumed}"
                          + (f"; {info.processes} training processes (torchrun)"
                             if info.processes > 1 else ""))

    result = run_adapt(data, out, config, pixel_cache=pixel_cache, resume=resume,
                       overwrite=overwrite, device=device, progress=not no_progress,
                       trust_pickle=trust_pickle, csv_path=csv, train_val_list=train_val_list,
                       test_list=test_list, data_options=data_options(source),
                       on_start=started)
    if not main_process:
        return
    if json_out:
        print_json(result.to_dict())
        return
    _show_result(result)


def _fmt(value: float | None) -> str:
    return "[dim]undefined[/]" if value is None else f"{value:.4f}"


def _show_result(result: Any) -> None:
    table = Table(title=f"{result.out}: best epoch {result.best_epoch} of {result.epochs_run}"
                  + (" (early stop)" if result.stopped_early else ""))
    table.add_column("class")
    table.add_column("val AUC", justify="right")
    table.add_column("test AUC", justify="right")
    for name in result.label_names or LABELS:
        table.add_row(name, _fmt(result.val_auc.get(name)), _fmt(result.test_auc.get(name)))
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{_fmt(result.val_mean_auc)}[/]",
                  f"[bold]{_fmt(result.test_mean_auc)}[/]")
    console.print(table)
    if result.stop_reason:
        console.print(result.stop_reason)
    for split, names in result.undefined.items():
        if names:
            console.print(f"[yellow]{split}[/]: no positives (or no negatives) of "
                          f"{', '.join(names)}: AUC undefined, left out of the mean")
    console.print(f"trainable parameters: {result.trainable_params:,}; adapted encoder: "
                  f"{Path(result.out) / 'model.safetensors'}")


def data_options(source: ReaderOptions | None) -> dict[str, Any]:
    """The reader options given (``dataset`` and those set), as the library takes them."""
    source = source or ReaderOptions()
    return {"dataset": source.dataset,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in source.options().items()
               if v is not None and not (k == "follow_links" and not v)}}


# typer reads the signature: replace **config_values by one keyword option per field.
_signature = inspect.signature(adapt, eval_str=True)
adapt.__signature__ = _signature.replace(parameters=[
    p for p in _signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
] + _config_options())
app.command()(reader_options(adapt))
