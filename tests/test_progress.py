"""The progress bar's rate: work done over time taken, however the work arrives."""

from __future__ import annotations

import io

from rich.console import Console

import cxrembed.progress as progress_module
from cxrembed.progress import progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rendered_rate(monkeypatch, steps, done: int = 0) -> str:
    """Run the bar on a fake clock; ``steps`` are (seconds later, images done)."""
    out = io.StringIO()
    monkeypatch.setattr(progress_module, "console",
                        Console(file=out, width=200, force_terminal=False))
    clock = Clock()
    with progress_bar(2000, "caching pixels", done=done, clock=clock) as advance:
        for seconds, n in steps:
            clock.now += seconds
            advance(n)
    return out.getvalue()


def test_rate_of_a_burst_is_the_average_not_the_last_gap(monkeypatch):
    # A process pool delivers blocks of 256 in bursts: three blocks arrive 5 ms apart
    # after 8.5 s of work. Rich's own speed read 256 / 0.005 = 51,200 img/s here.
    text = _rendered_rate(monkeypatch, [(8.5, 256), (0.005, 256), (0.005, 256)])
    assert "90.2 img/s" in text  # 768 images in 8.51 s
    assert "51,200" not in text


def test_rate_leaves_out_the_rows_of_an_earlier_run(monkeypatch):
    text = _rendered_rate(monkeypatch, [(2.0, 100), (2.0, 100)], done=1500)
    assert "1700/2000" in text and "50.0 img/s" in text
