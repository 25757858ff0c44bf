"""The long fuzz campaign: every property of tests/fuzz with N random examples each.

CI runs tests/fuzz with 12 derandomised examples per property (about 10 s); this runs
the same properties with ``--examples N`` fresh random examples each (hypothesis's
``CXREMBED_FUZZ_EXAMPLES``), and prints, per property, the examples run and whether a
failure was found (hypothesis shrinks it and prints the smallest input that fails)::

    nice -n 15 python benchmarks/fuzz.py --examples 1000

Figures go to benchmarks/RELIABILITY.md ("Hostile input" section) with the command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per property")
    parser.add_argument("-k", default=None, help="only properties matching (pytest -k)")
    args = parser.parse_args()
    env = dict(os.environ, CXREMBED_FUZZ_EXAMPLES=str(args.examples))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics", "-o", "addopts=", "-p", "no:randomly",
               "--timeout", "3600", str(ROOT / "tests" / "fuzz")]
    if args.k:
        command += ["-k", args.k]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    text = run.stdout + run.stderr
    rows = []
    for block in re.split(r"\n(?=tests/fuzz/\S+::\w+:\n)", text):
        name = re.match(r"tests/fuzz/\S+::(\w+):", block)
        counts = re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid", block)
        secs = re.findall(r"during \w+ phase \(([\d.]+) seconds\)", block)
        if name and counts:
            passing, failing, invalid = (sum(int(c[i]) for c in counts) for i in range(3))
            rows.append((name.group(1), passing, failing, invalid, sum(map(float, secs))))
    print(f"{'property':<52} {'passing':>8} {'failing':>8} {'invalid':>8} {'seconds':>8}")
    for name, passing, failing, invalid, secs in rows:
        print(f"{name:<52} {passing:>8} {failing:>8} {invalid:>8} {secs:>8.1f}")
    total = sum(r[1] for r in rows)
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    print(f"\n{len(rows)} properties, {total} passing examples in all, {len(failed)} "
          f"properties failing; {seconds:.0f} s wall (examples asked: {args.examples} each)")
    for line in failed:
        print(line)
    if run.returncode not in (0, 1) or not rows:
        print(text[-4000:])
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
