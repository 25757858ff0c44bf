"""What every command shares: the console, the error edge, JSON output, common options."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cxrembed.errors import CxrembedError, DiskFullError
from cxrembed.files import is_disk_full
from cxrembed.fewshot.results import to_jsonable
from cxrembed.progress import console  # one stderr console: messages, logs, progress bars

app = typer.Typer(
    name="cxrembed",
    help="Label-efficient chest X-ray diagnosis on cached CLIP embeddings.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130  # usage errors exit with click's own code, 2
#: Commands that continue where they stopped when run again, without a --resume option.
RESUME_BY_RERUNNING = {"cache", "demo", "predict"}
#: Commands that run until Ctrl-C: stopping them so is their normal end (exit 0).
STOPPED_BY_CTRL_C = {"serve"}


def run_guarded(app: typer.Typer) -> None:
    """Run ``app`` as a command and exit with its code: 0 done, 1 a CxrembedError or OS
    error (one red line), 2 a usage error (click's usage line and message), 130 Ctrl-C.

    The app runs with ``standalone_mode=False`` so that errors reach this edge; how typer
    reports a usage error or Ctrl-C then differs between its versions (0.12 raises click's
    exceptions and turns Ctrl-C into ``Abort``; 0.29 raises those of its bundled click and
    returns 130), so a SIGINT is recorded here, whatever typer makes of it.
    """
    sigint = _SigintRecorder()
    try:
        code = _run(app)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:  # a bug or a library's error: its traceback follows
        _record_for_torchrun(exc)
        raise
    interrupted = sigint.received or code == EXIT_INTERRUPTED
    if interrupted and _command(app, sys.argv[1:]) in STOPPED_BY_CTRL_C:
        code = 0  # the command said it stopped; Ctrl-C is how a server is stopped
    elif interrupted:
        console.print(f"[yellow]interrupted[/]: {_resume_hint(app, sys.argv[1:])}",
                      highlight=False)
        code = EXIT_INTERRUPTED
    sys.exit(code)


def _command(app: typer.Typer, args: list[str]) -> str | None:
    """The name of the subcommand on the command line, if any."""
    group = typer.main.get_command(app)
    return next((a for a in args if a in getattr(group, "commands", {})), None)


def _resume_hint(app: typer.Typer, args: list[str]) -> str:
    """What to run to continue the interrupted command."""
    group = typer.main.get_command(app)
    name = _command(app, args)
    if name is None:
        return "nothing was finished"
    options = {opt for param in group.commands[name].params for opt in param.opts}
    if "--append" in args:  # encode --append continues its .appending store when rerun
        return "what was written so far is kept; rerun the same command to continue"
    if "--resume" in options:
        return "what was written so far is kept; rerun with --resume to continue"
    if name in RESUME_BY_RERUNNING:
        return "what was written so far is kept; rerun the same command to continue"
    return f"`cxrembed {name}` did not finish; run it again"


def _run(app: typer.Typer) -> int:
    usage_error = _click_exception_class()
    try:
        returned = app(standalone_mode=False)
    except (CxrembedError, OSError, RuntimeError) as exc:
        # OSError: disk full, permissions, no folder; RuntimeError: a library's failed
        # write (h5py, faiss) on a full disk, any other is a bug and keeps its traceback.
        if isinstance(exc, RuntimeError) and not is_disk_full(exc):
            raise
        console.print(f"[bold red]error{_which_rank()}:[/] {_disk_full_hint(exc, app)}",
                      highlight=False, soft_wrap=True)
        _record_for_torchrun(exc)
        return EXIT_ERROR
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort as exc:
        return EXIT_INTERRUPTED if isinstance(exc.__cause__, KeyboardInterrupt) else EXIT_ERROR
    except usage_error as exc:  # bad option or value, missing argument, unknown command
        exc.show()
        return exc.exit_code
    # Without standalone mode typer returns the command's value, or the code of an Exit.
    return returned if type(returned) is int else 0


def _which_rank() -> str:
    """`` (rank 1 of 4)`` in a torchrun job, so that the error names its process."""
    from cxrembed.distributed import launch

    try:
        here = launch()
    except CxrembedError:
        return ""
    return f" ({here})" if here.distributed else ""


def _record_for_torchrun(exc: BaseException) -> None:
    """Hand the error to torchrun (its error file), whose failure summary then shows this
    rank's message as the job's root cause rather than "error_file: <N/A>"."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    handler.record_exception(exc)


def _disk_full_hint(exc: BaseException, app: typer.Typer) -> str:
    """The error's message; on a full disk, with what to run once space is freed."""
    if not (isinstance(exc, DiskFullError) or is_disk_full(exc)):
        return str(exc)
    text = str(exc) if isinstance(exc, DiskFullError) else \
        f"no space left on the device ({exc}); free disk space"
    return f"{text} ({_resume_hint(app, sys.argv[1:])})"


def _click_exception_class() -> type[Exception]:
    """The ClickException class of the click that this typer uses (typer 0.29 bundles its
    own copy, typer._click; 0.12 uses click): found through typer's public BadParameter."""
    return next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


class _SigintRecorder:
    """Notes that SIGINT arrived, then lets Python raise KeyboardInterrupt as usual (so
    the library's cleanup runs unchanged).

    Python runs a signal handler between two bytecodes of the main thread, which may be
    inside a callback that C code called (a weakref finaliser, an h5py object's cleanup):
    there the KeyboardInterrupt is printed as "Exception ignored" and swallowed, and the
    command would run on. Such a swallowed interrupt is delivered again instead.
    """

    def __init__(self) -> None:
        self.received = False
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            return
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._redeliver

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        signal.default_int_handler(signum, frame)

    def _redeliver(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            import _thread

            _thread.interrupt_main()  # runs _handle again, outside this callback
            return
        self._unraisable(unraisable)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout (nothing else goes to stdout)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=to_jsonable) + "\n")


# ---------------------------------------------------------------------------------------
# Arguments and options shared by several commands (declared once, reused by name).

StoreArg = Annotated[Path, typer.Argument(
    help="Embedding store (.h5) written by `cxrembed encode`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]

# Options every command that reads an NIH folder takes.

DataArg = Annotated[Path, typer.Argument(help=(
    "Data folder: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest, class folders, or a "
    "labelled CSV (--dataset csv); the kind is detected unless --dataset names it."))]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Metadata CSV elsewhere "
                                                "(NIH Data_Entry_2017*.csv[.gz], PadChest's "
                                                "CSV) or the CSV to read with --dataset csv.")]
TrainValListOpt = Annotated[Optional[Path], typer.Option("--train-val-list",
                                                         help="train_val_list.txt elsewhere.")]
TestListOpt = Annotated[Optional[Path], typer.Option("--test-list", help="test_list.txt elsewhere.")]
ViewOpt = Annotated[str, typer.Option("--view", "--views", help=(
    "Views to keep: all, frontal, lateral, or view values comma-separated (PA,AP)."))]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction",
                                               help="Share of train_val patients held out as val.")]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the patient split.")]
AllowMissingOpt = Annotated[bool, typer.Option(
    "--allow-missing", help="Continue with the images present on disk (e.g. the 5% sample).")]


def load_dataset(data: Path, csv: Path | None, train_val_list: Path | None,
                 test_list: Path | None, view: str, val_fraction: float, split_seed: int,
                 allow_missing: bool, keep_missing: bool = False,
                 source: "ReaderOptions | None" = None):
    """The one call every data-reading command makes (``source``: the reader options that
    :func:`reader_options` adds to a command)."""
    from cxrembed.data import load_dataset as load

    source = source or ReaderOptions()
    return load(data, source.dataset, csv_path=csv, train_val_list=train_val_list,
                test_list=test_list, view=view, val_fraction=val_fraction, seed=split_seed,
                missing="keep" if keep_missing else ("drop" if allow_missing else "error"),
                **source.options())


# ---------------------------------------------------------------------------------------
# Reader options (--dataset and the options of the CheXpert/MIMIC/PadChest/csv readers),
# added to a command by one decorator and handed to it as one ``source`` argument.

import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402


@dataclasses.dataclass
class ReaderOptions:
    """What :func:`cxrembed.data.load_dataset` takes beyond the NIH options."""

    dataset: str = "auto"
    uncertain: str = "ignore"
    blank: str = "negative"
    test_fraction: float = 0.1
    images: Optional[Path] = None
    image_col: Optional[str] = None
    label_cols: Optional[str] = None
    label_col: Optional[str] = None
    label_sep: str = "|"
    patient_col: Optional[str] = None
    split_col: Optional[str] = None
    view_col: Optional[str] = None
    age_col: Optional[str] = None
    sex_col: Optional[str] = None
    follow_links: bool = False

    def options(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "dataset"}


_READER_PARAMS = {
    "dataset": (str, typer.Option("--dataset", help=(
        "auto (detect), nih, chexpert, mimic, padchest, csv or folders."))),
    "uncertain": (str, typer.Option("--uncertain", help=(
        "Uncertain (-1) labels: ignore (left out of loss and AUC), ones or zeros."))),
    "blank": (str, typer.Option("--blank", help=(
        "Blank label cells (not mentioned): negative, or unknown (left out)."))),
    "test_fraction": (float, typer.Option("--test-fraction", help=(
        "Share of patients held out as test when the collection ships no test split."))),
    "images": (Optional[Path], typer.Option("--images", help=(
        "--dataset csv: folder the image paths are relative to (default: the CSV's)."))),
    "image_col": (Optional[str], typer.Option("--image-col", help="--dataset csv: image path column.")),
    "label_cols": (Optional[str], typer.Option("--label-cols", help=(
        "--dataset csv: label columns A,B,C holding 1/0/-1/blank."))),
    "label_col": (Optional[str], typer.Option("--label-col", help=(
        "--dataset csv: one text column of labels, split on --label-sep."))),
    "label_sep": (str, typer.Option("--label-sep", help="Separator of --label-col ('|', '/').")),
    "patient_col": (Optional[str], typer.Option("--patient-col", help="--dataset csv: patient id column.")),
    "split_col": (Optional[str], typer.Option("--split-col", help="--dataset csv: train/val/test column.")),
    "view_col": (Optional[str], typer.Option("--view-col", help="--dataset csv: view column (PA, AP, ...).")),
    "age_col": (Optional[str], typer.Option("--age-col", help="--dataset csv: age column.")),
    "sex_col": (Optional[str], typer.Option("--sex-col", help="--dataset csv: sex column.")),
    "follow_links": (bool, typer.Option("--follow-links", help=(
        "Follow symbolic links inside the data folder that lead out of it (e.g. images_001 "
        "-> a bigger disk, made by you); refused otherwise."))),
}


def reader_options(command=None, *, exclude: tuple[str, ...] = ()):
    """Add the reader options to a command; it receives them as ``source: ReaderOptions``.

    ``exclude``: reader options the command does not offer (one whose flag it uses for
    something else, as ``demo --images``); they keep their defaults."""
    if command is None:
        return functools.partial(reader_options, exclude=exclude)
    offered = {name: spec for name, spec in _READER_PARAMS.items() if name not in exclude}
    signature = inspect.signature(command, eval_str=True)  # resolve Annotated options
    params = [p for p in signature.parameters.values() if p.name != "source"]
    defaults = ReaderOptions()
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                 default=getattr(defaults, name), annotation=Annotated[kind, opt])
               for name, (kind, opt) in offered.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        source = ReaderOptions(**{name: kwargs.pop(name) for name in offered
                                  if name in kwargs})
        return command(*args, source=source, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper
