"""Progress bars (rich, on stderr) that library code can use without printing.

Every long-running entry point takes ``progress: bool``; scripts and tests pass False.
``console`` is the one stderr console of the package: the command line prints its messages
and log lines through it too, so that they appear above a running bar, not through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img",
                 done: int = 0, clock: Callable[[], float] = time.monotonic
                 ) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows the rate in ``unit``/s and any extra fields.

    The rate is the work done in this call over the time since the bar started. (Rich's own
    estimate divides by the gap between the last two updates: results that arrive in a
    burst, as a process pool delivers them, made it read 50,000 img/s at 90.) ``done``
    units were finished before (a resumed build): the bar starts there, the rate leaves
    them out.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[cyan]{task.fields[rate]}"), TextColumn("{task.fields[extra]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, get_time=clock) as bar:
        task = bar.add_task(description, total=total, completed=done, rate="", extra="")
        started = clock()
        counted = 0  # work done since the bar started

        def advance(n: int = 1, **fields: object) -> None:
            nonlocal counted
            counted += n
            elapsed = clock() - started
            rate = f"{counted / elapsed:,.1f} {unit}/s" if counted and elapsed > 0 else ""
            extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in fields.items())
            bar.update(task, advance=n, rate=rate, extra=extra)

        yield advance
