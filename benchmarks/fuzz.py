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
    rows = re.findall(r"(test_fuzz_\w+\.py)::(\w+):\s*\n(?:.*\n)*?\s*- during generate phase "
                      r"\(([\d.]+) seconds\):\s*\n\s*- Typical runtimes: .*\n\s*- (\d+) passing "
                      r"examples?, (\d+) failing examples?, (\d+) invalid", text)
    print(f"{'property':<52} {'passing':>8} {'failing':>8} {'invalid':>8} {'seconds':>8}")
    for module, name, secs, passing, failing, invalid in rows:
        print(f"{name:<52} {passing:>8} {failing:>8} {invalid:>8} {float(secs):>8.1f}")
    total = sum(int(r[3]) for r in rows)
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
