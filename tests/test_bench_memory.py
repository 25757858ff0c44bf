"""benchmarks/memory.py shows each command's figure the moment that command ends (a 100k
run takes hours: its table must fill in as it goes, not one size at a time)."""

from __future__ import annotations

import sys
from pathlib import Path


def test_every_figure_is_printed_before_the_next_command_starts(tmp_path, monkeypatch, capsys,
                                                                benchmark_script):
    bench = benchmark_script("memory")
    ran: list[tuple[str, str]] = []  # (command, what stdout held when it started)
    figures = iter(range(100, 10_000, 100))

    def fake_peak_rss(argv, log):
        ran.append((argv[0], capsys.readouterr().out))
        if argv[0] == "synth":
            (Path(argv[1]) / "images_001").mkdir(parents=True)
        if argv[0] == "fit":
            Path(argv[argv.index("--out") + 1]).mkdir()
        return float(next(figures)), 7.0

    monkeypatch.setattr(bench, "peak_rss", fake_peak_rss)
    monkeypatch.setattr(sys, "argv", ["memory.py", "--work", str(tmp_path), "--sizes",
                                      "1000,10000"])
    bench.main()
    out = "".join(seen for _, seen in ran) + capsys.readouterr().out
    commands = [name for name, _ in ran]
    assert commands == ["synth", "encode", "encode", "fit", "predict",
                        "synth", "encode", "encode", "predict"]
    seen = [held for _, held in ran]
    # each figure is out before the next command starts (the fit is not a column)
    assert seen[1:6] == ["| 1,000 |", " 200 (7) |", " 300 (7) |", "", " 500 (7) |\n"]
    assert seen[6:] == ["| 10,000 |", " 700 (7) |", " 800 (7) |"]
    rows = [line for line in out.splitlines() if line.startswith("| 1")]
    assert rows == ["| 1,000 | 200 (7) | 300 (7) | 500 (7) |",
                    "| 10,000 | 700 (7) | 800 (7) | 900 (7) |"]
