"""The ``cxrembed`` command: parse, call one library function, print.

Each area registers its commands from its own module (``cli/data.py``, ``cli/adapt.py``,
...) on the one ``app`` of :mod:`cxrembed.cli.common`; the library does the work and never
prints.
"""

from __future__ import annotations

import os
import sys

# Before anything imports torch (the command modules below do): OpenMP threads that spin
# while waiting make torch on a small, shared CPU 10-40x slower whenever another process
# holds a core (measured: a cxr-tiny training step took 2.3 s with spinning, 0.06 s with
# passive waits, on 2 cores with one busy). Set for the command only, never by
# `import cxrembed` (a library must not change its host process); a value in the
# environment wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import warnings  # noqa: E402

import typer  # noqa: E402

from cxrembed import __version__  # noqa: E402
from cxrembed.cli.common import app, console, run_guarded  # noqa: E402


def _version(value: bool) -> None:
    if value:
        console.print(f"cxrembed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """cxrembed: adapt CLIP once, encode once, then iterate in seconds on cached vectors."""
    from rich.logging import RichHandler

    from cxrembed.distributed import launch

    # Under torchrun every rank would repeat rank 0's warnings: the others log errors only.
    quiet = logging.WARNING if launch().main else logging.ERROR
    logging.basicConfig(level=logging.DEBUG if verbose else quiet, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # A warning is a message for the person at the terminal, not a source location.
        where = f" ({filename}:{lineno})" if verbose else ""
        console.print(f"[yellow]warning:[/] {message}{where}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


# Command modules register themselves on `app` when imported.
from cxrembed.cli import data as _data  # noqa: E402,F401
from cxrembed.cli import store as _store  # noqa: E402,F401
from cxrembed.cli import adapt as _adapt  # noqa: E402,F401
from cxrembed.cli import evaluate as _evaluate  # noqa: E402,F401
from cxrembed.cli import demo as _demo  # noqa: E402,F401
from cxrembed.cli import predict as _predict  # noqa: E402,F401
from cxrembed.cli import serve as _serve  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    run_guarded(app)
