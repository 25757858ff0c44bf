"""What every command shares: the consoles, the error edge, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from cxrembed.errors import CxrembedError
from cxrembed.fewshot.results import to_jsonable

app = typer.Typer(
    name="cxrembed",
    help="Label-efficient chest X-ray diagnosis on cached CLIP embeddings.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)  # tables, progress, messages
stdout = Console()  # results meant for pipes (--json)


def run_guarded(app: typer.Typer) -> None:
    """Run the app; a CxrembedError becomes a red message and exit code 1."""
    try:
        app(standalone_mode=False)
    except CxrembedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # disk full, permissions, a folder that is not there
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: what was written so far is kept; "
                      "rerun with --resume to continue")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout (nothing else goes to stdout)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=to_jsonable) + "\n")


# ---------------------------------------------------------------------------------------
# Options every command that reads an NIH folder takes (declare once, reuse by name).

from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

DataArg = Annotated[Path, typer.Argument(help="NIH ChestX-ray14 folder (official layout, "
                                         "images/ or flat).")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Metadata CSV elsewhere "
                                                "(Data_Entry_2017*.csv[.gz]).")]
TrainValListOpt = Annotated[Optional[Path], typer.Option("--train-val-list",
                                                         help="train_val_list.txt elsewhere.")]
TestListOpt = Annotated[Optional[Path], typer.Option("--test-list", help="test_list.txt elsewhere.")]
ViewOpt = Annotated[str, typer.Option("--view", help="Keep PA, AP or all views.")]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction",
                                               help="Share of train_val patients held out as val.")]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the patient split.")]
AllowMissingOpt = Annotated[bool, typer.Option(
    "--allow-missing", help="Continue with the images present on disk (e.g. the 5% sample).")]


def load_dataset(data: Path, csv: Path | None, train_val_list: Path | None,
                 test_list: Path | None, view: str, val_fraction: float, split_seed: int,
                 allow_missing: bool, keep_missing: bool = False):
    """The one call every data-reading command makes."""
    from cxrembed.data import load_nih

    return load_nih(data, csv_path=csv, train_val_list=train_val_list, test_list=test_list,
                    view=view, val_fraction=val_fraction, seed=split_seed,
                    missing="keep" if keep_missing else ("drop" if allow_missing else "error"))
