"""Progress bars (rich, on stderr) that library code can use without printing.

Every long-running entry point takes ``progress: bool``; scripts and tests pass False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

_console = Console(stderr=True)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img"
                 ) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows rate in ``unit``/s and any extra fields."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[cyan]{task.fields[rate]}"), TextColumn("{task.fields[extra]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="", extra="")

        def advance(n: int = 1, **fields: object) -> None:
            speed = bar.tasks[0].speed
            rate = f"{speed:,.0f} {unit}/s" if speed else ""
            extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in fields.items())
            bar.update(task, advance=n, rate=rate, extra=extra)

        yield advance
