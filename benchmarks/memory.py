"""Peak memory of `cxrembed encode` and `cxrembed predict` as the number of images grows.

    nice -n 15 python benchmarks/memory.py --work /tmp/cxrembed-memory --sizes 1000,10000

For each size, a synthetic NIH twin of that many 32 px PNGs (``cxrembed synth``) is
encoded with cxr-tiny (no pixel cache: PNGs decoded by the reader threads) into a store,
once without an index (the reader -> mapper -> writer pipeline alone) and once with the
flat FAISS index (which holds every vector by design); then every image of the twin is
scored by ``cxrembed predict`` with a linear head fitted on the first size's store, into
a CSV. The figure is the peak resident set size of the command's process (``ru_maxrss``
from ``wait4``, which covers the process itself, not children that it waited for),
i.e. the most physical memory it held at any moment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

CXREMBED = shutil.which("cxrembed") or "cxrembed"


def peak_rss(argv: list[str], log: Path) -> tuple[float, float]:
    """Run to the end; (peak RSS in MiB, seconds). Exits on failure."""
    start = time.perf_counter()
    with open(log, "ab") as sink:
        proc = subprocess.Popen([CXREMBED, *argv], stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)} failed; see {log}")
    return usage.ru_maxrss / 1024, took  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxrembed-memory"))
    parser.add_argument("--sizes", default="1000,10000")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    sizes = [int(s) for s in args.sizes.split(",")]
    head = args.work / "head"
    print("| images | encode, no index: peak RSS MiB (s) | encode + flat index: peak RSS MiB "
          "(s) | predict to CSV: peak RSS MiB (s) |\n|---|---|---|---|", flush=True)
    for n in sizes:
        twin = args.work / f"twin-{n}"
        if not twin.exists():
            peak_rss(["synth", str(twin), "--images", str(n), "--size", "32", "--seed", "0"],
                     log)
        print(f"| {n:,} |", end="", flush=True)  # each cell as soon as its command ends
        common = ["--model", "cxr-tiny", "--pretrained", "none", "--batch-size", "64",
                  "--workers", "2", "--device", "cpu", "--no-progress", "--overwrite"]
        cell(peak_rss(["encode", str(twin), "--out", str(args.work / f"bare-{n}.h5"),
                       "--index", "none", *common], log))
        store = args.work / f"store-{n}.h5"
        cell(peak_rss(["encode", str(twin), "--out", str(store), "--index", "flat", *common],
                      log))
        if not head.exists():
            peak_rss(["fit", str(store), "--head", "linear", "--all", "--out", str(head)], log)
        preds = args.work / f"preds-{n}.csv"
        preds.unlink(missing_ok=True)
        cell(peak_rss(["predict", str(twin / "images_001"), "--head", str(head), "--out",
                       str(preds), "--batch-size", "32", "--workers", "2", "--device", "cpu",
                       "--no-progress"], log))
        print(flush=True)


def cell(figure: tuple[float, float]) -> None:
    """One table cell, printed (and flushed) the moment its command has ended."""
    print(f" {figure[0]:.0f} ({figure[1]:.0f}) |", end="", flush=True)


if __name__ == "__main__":
    main()
