"""Full-disk campaign: run real ``cxrembed`` commands on a small tmpfs filled so that the
disk runs out at a seeded random point of their output, then free the space, resume, and
compare with an uninterrupted run (the same comparisons as benchmarks/faults.py).

    nice -n 15 python benchmarks/faults_disk.py --work /tmp/cxrembed-faults --runs 10

Needs benchmarks/faults.py to have made WORK/inputs and WORK/reference (run it first, or
with ``--commands`` covering the same commands). The tmpfs is mounted in a user and mount
namespace of its own (``unshare -rm``: no root needed where unprivileged user namespaces
are allowed), so the writes fail with ENOSPC exactly as on a full disk.

Per trial: free space = a fraction, drawn uniformly from [0.02, 0.98) (seeded), of the
reference output's size; the command must then fail with exit 1, no traceback, and a
message that says "no space left" (or finish, when its output fitted after all); after
the filler file is deleted, its resume route must finish with a result identical to the
reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults import commands, prepare  # noqa: E402

TMPFS_MIB = 160


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fill(mount: Path, leave: int) -> Path:
    """A filler file taking all of the tmpfs's free space but ``leave`` bytes."""
    filler = mount / "filler"
    room = shutil.disk_usage(mount).free - leave
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        while room > 0:
            f.write(block[:min(room, len(block))])
            room -= len(block)
    return filler


def trial(cmd, mount: Path, index: int, fraction: float, reference: Path, exclude: list[str]
          ) -> dict:
    out = mount / f"{cmd.name}-{index:03d}"
    out.mkdir()
    leave = int(fraction * size_of(reference))
    filler = fill(mount, leave)
    first = subprocess.run(cmd.args(out), capture_output=True, text=True, timeout=1800)
    message = " ".join(first.stderr.split()).lower()
    record = {"command": cmd.name, "trial": index, "free_bytes": leave,
              "first_exit": first.returncode,
              # refused by the space check before writing, or failed mid-write
              "before_writing": "needs at least" in message,
              "clean_error": first.returncode == 1 and "Traceback" not in first.stderr
              and "no space left" in message and "free disk space" in message}
    if first.returncode not in (0, 1) or (first.returncode == 1 and not record["clean_error"]):
        record["why"] = message[-300:]
    filler.unlink()
    resumed = subprocess.run(cmd.args(out, resume=True), capture_output=True, text=True,
                             timeout=1800) if first.returncode else first
    diff = [f"resume exited {resumed.returncode}: "
            + " ".join(resumed.stderr.split())[-300:]] if resumed.returncode else []
    diff = diff or cmd.compare(reference, out / cmd.result, exclude)
    record.update(resume_exit=resumed.returncode, survived=not diff,
                  why=record.get("why", "") + "; ".join(diff[:3]))
    shutil.rmtree(out)
    return record


def inside(args) -> None:
    mount = args.work / "tmpfs"
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(mount)],
                   check=True)
    inputs = prepare(args.work, 0, 0)  # made by faults.py: nothing is made again
    exclude = {"adapt": ["images_per_s", "train_seconds", "out"],
               "encode": ["/@created", "/@finished", "/@uuid"], "fit": ["created"]}
    rows = []
    for number, cmd in enumerate(c for c in commands(inputs) if c.name in args.commands):
        reference = args.work / "reference" / cmd.name / "ref-a" / cmd.result
        rng = np.random.default_rng([args.seed, 100 + number])
        done = [trial(cmd, mount, i, float(rng.uniform(0.02, 0.98)), reference,
                      exclude.get(cmd.name, [])) for i in range(args.runs)]
        full = [t for t in done if t["first_exit"]]
        rows.append((cmd.name, len(done), len(full), sum(t["before_writing"] for t in full),
                     sum(t["clean_error"] for t in full),
                     sum(t["survived"] for t in done),
                     [f"#{t['trial']} ({t['free_bytes']:,} B free): {t['why']}"
                      for t in done if not t["survived"] or (t["first_exit"]
                                                             and not t["clean_error"])]))
        print(f"{cmd.name}: {rows[-1][1:6]}", flush=True)
    print("\n| command | runs | ran out of space | of which refused before writing | clean "
          "error (exit 1, no traceback, says to free space) | resumed after freeing space, "
          "identical |\n|---|---|---|---|---|---|")
    for name, runs, full, early, clean, survived, _ in rows:
        print(f"| {name} | {runs} | {full} | {early} | {clean} / {full} | "
              f"{survived} / {runs} |")
    for name, *_, failures in rows:
        for failure in failures:
            print(f"- {name} {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxrembed-faults"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default="cache,adapt,encode,predict")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.commands = args.commands.split(",")
    if args.inside:
        inside(args)
        return
    if not shutil.which("unshare"):
        raise SystemExit("unshare (util-linux) is needed to mount a tmpfs without root")
    argv = [sys.executable, os.path.abspath(__file__), "--inside", "--work", str(args.work),
            "--runs", str(args.runs), "--seed", str(args.seed), "--commands",
            ",".join(args.commands)]
    raise SystemExit(subprocess.run(["unshare", "-rm", *argv]).returncode)


if __name__ == "__main__":
    main()
