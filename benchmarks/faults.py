"""Kill -9 campaign: interrupt real ``cxrembed`` commands at seeded random moments, resume
them the way a user would, and compare the result with an uninterrupted run.

    nice -n 15 python benchmarks/faults.py --work /tmp/cxrembed-faults --runs 20 --seed 0

Each command runs as a subprocess of the installed ``cxrembed`` (in its own session, so
that ``kill -9`` of the process group also takes its decoding workers, as a power cut
would) on the synthetic twin with ``cxr-tiny``. For every command:

1. two uninterrupted reference runs: the first gives the result to compare with, the
   shorter of the two the run time T; what differs between them (attributes such as the
   creation time) alone is excluded from the comparison, and named in the output;
2. trials until ``--runs`` of them were killed mid-run: start the command, ``kill -9``
   it after a delay drawn uniformly from [0, T) (seeded), run its resume route to the
   end, compare with the reference.

Comparisons: pixel cache and prediction CSV byte for byte; store dataset by dataset and
attribute by attribute, plus its FAISS index byte for byte; adapt run metric for metric
(metrics.jsonl, summary.json, timing fields excluded) plus model.safetensors byte for
byte; fit's head.npz byte for byte and head.json key for key.

Prints a markdown table (and ``--json`` writes every trial). Trials that fail keep their
folder under ``WORK/trials`` for inspection; the others are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faults_compare import compare_adapt, compare_bytes, compare_head, compare_store  # noqa: E402

CXREMBED = shutil.which("cxrembed") or "cxrembed"
#: The adapt run's fields that are wall-clock measurements, not results.
ADAPT_TIMING = ("images_per_s", "train_seconds")


@dataclass
class Command:
    """One command of the campaign: how to run it into folder ``out``, how to resume it
    there, and how to compare its result with the reference run's."""

    name: str
    argv: list[str]  # "{out}" stands for the trial's folder
    resume_extra: list[str]  # appended for the resume route (empty: rerun the same)
    result: str  # path of the result inside the folder
    compare: object  # (reference, candidate, excluded) -> list of differences
    exclude: list[str] = field(default_factory=list)  # found by comparing two clean runs

    def args(self, out: Path, resume: bool = False) -> list[str]:
        argv = [a.replace("{out}", str(out)) for a in self.argv]
        return [CXREMBED, *argv, *(self.resume_extra if resume else [])]


def run(argv: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run to the end; returns (exit code, seconds)."""
    start = time.perf_counter()
    with open(log, "ab") as sink:
        proc = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, time.perf_counter() - start


def run_and_kill(argv: list[str], log: Path, delay: float) -> tuple[bool, float]:
    """Start the command and kill -9 its whole process group after ``delay`` seconds;
    returns whether it was still running then, and how long it ran."""
    start = time.perf_counter()
    with open(log, "ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
            return False, time.perf_counter() - start
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, time.perf_counter() - start


def prepare(work: Path, images: int, small: int) -> dict[str, Path]:
    """The synthetic twins and the inputs each command needs (made uninterrupted)."""
    inputs = {"big": work / "twin-big", "small": work / "twin-small",
              "big_pixels": work / "inputs" / "big-pixels.h5",
              "small_pixels": work / "inputs" / "small-pixels.h5",
              "run": work / "inputs" / "run", "store": work / "inputs" / "store.h5",
              "head": work / "inputs" / "head"}
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    steps = [
        ("big", ["synth", "{big}", "--images", str(images), "--size", "64", "--seed", "0"]),
        ("small", ["synth", "{small}", "--images", str(small), "--size", "64", "--seed", "1"]),
        ("big_pixels", ["cache", "{big}", "--out", "{big_pixels}", "--workers", "1",
                        "--no-progress"]),
        ("small_pixels", ["cache", "{small}", "--out", "{small_pixels}", "--workers", "1",
                          "--no-progress"]),
        ("run", ADAPT_ARGS(inputs["small"], inputs["small_pixels"], "{run}")),
        ("store", ENCODE_ARGS(inputs["big"], inputs["big_pixels"], "{run}", "{store}")),
        ("head", ["fit", "{store}", "--head", "linear", "--all", "--out", "{head}"]),
    ]
    for name, argv in steps:
        if inputs[name].exists():
            continue
        argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
        code, _ = run([CXREMBED, *argv], work / "inputs.log", timeout=1800)
        if code:
            raise SystemExit(f"preparing {name} failed (exit {code}); see {work / 'inputs.log'}")
    return inputs


def ADAPT_ARGS(data: Path, pixels: Path, out: str) -> list[str]:  # noqa: N802
    return ["adapt", str(data), "--out", out, "--pixel-cache", str(pixels), "--model",
            "cxr-tiny", "--pretrained", "none", "--epochs", "2", "--batch-size", "16",
            "--device", "cpu", "--workers", "0", "--no-progress"]


def ENCODE_ARGS(data: Path, pixels: Path, run_dir: str, out: str) -> list[str]:  # noqa: N802
    return ["encode", str(data), "--out", out, "--checkpoint", run_dir, "--allow-other-data",
            "--pixel-cache", str(pixels), "--device", "cpu", "--batch-size", "64",
            "--workers", "1", "--no-progress"]


def commands(inputs: dict[str, Path]) -> list[Command]:
    return [
        Command("cache", ["cache", str(inputs["big"]), "--out", "{out}/pixels.h5",
                          "--workers", "1", "--no-progress"], [], "pixels.h5", compare_bytes),
        Command("adapt", ADAPT_ARGS(inputs["small"], inputs["small_pixels"], "{out}/run"),
                ["--resume"], "run", compare_adapt, list(ADAPT_TIMING)),
        Command("encode", ENCODE_ARGS(inputs["big"], inputs["big_pixels"], str(inputs["run"]),
                                      "{out}/store.h5"), ["--resume"], "store.h5", compare_store),
        Command("fit", ["fit", str(inputs["store"]), "--head", "linear", "--all", "--out",
                        "{out}/head"], [], "head", compare_head),
        Command("predict", ["predict", str(inputs["small"] / "images_001"), "--head",
                            str(inputs["head"]), "--out", "{out}/preds.csv", "--device", "cpu",
                            "--batch-size", "16", "--workers", "1", "--no-progress"], [],
                "preds.csv", compare_bytes),
    ]


def references(cmd: Command, work: Path) -> tuple[Path, float, list[str]]:
    """Two clean runs: the reference, its run time, and what differs between them."""
    seconds = []
    for name in ("ref-a", "ref-b"):
        out = work / "reference" / cmd.name / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        code, took = run(cmd.args(out), out / "log.txt", timeout=1800)
        if code:
            raise SystemExit(f"reference run of {cmd.name} failed; see {out / 'log.txt'}")
        seconds.append(took)
    ref = work / "reference" / cmd.name
    clean_diff = cmd.compare(ref / "ref-a" / cmd.result, ref / "ref-b" / cmd.result, cmd.exclude)
    # The shorter of the two: on a shared machine a run can take twice as long as the
    # next, and a kill drawn past the end interrupts nothing.
    return ref / "ref-a" / cmd.result, min(seconds), clean_diff


def trial(cmd: Command, work: Path, index: int, delay: float, reference: Path,
          exclude: list[str], budget: float) -> dict:
    out = work / "trials" / cmd.name / f"{index:03d}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "log.txt"
    interrupted, ran = run_and_kill(cmd.args(out), log, delay)
    resumed, tries = 0, 0
    if interrupted:
        resumed, _ = run(cmd.args(out, resume=True), log, timeout=budget)
        tries = 1
    record = {"command": cmd.name, "trial": index, "kill_after_s": round(delay, 3),
              "interrupted": interrupted, "ran_s": round(ran, 3), "resume_exit": resumed}
    if resumed:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        record.update(survived=False, why=f"resume exited {resumed}: {' | '.join(tail)}")
    else:
        diff = cmd.compare(reference, out / cmd.result, exclude)
        record.update(survived=not diff, why="; ".join(diff[:3]))
    record["resumes"] = tries
    if record["survived"]:
        shutil.rmtree(out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxrembed-faults"))
    parser.add_argument("--runs", type=int, default=20, help="kills per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1100,
                        help="images of the twin for cache and encode (two store chunks)")
    parser.add_argument("--small", type=int, default=160, help="images for adapt and predict")
    parser.add_argument("--commands", default="cache,adapt,encode,fit,predict")
    parser.add_argument("--json", type=Path, help="write every trial here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args.work, args.images, args.small)
    wanted = args.commands.split(",")
    rows, trials = [], []
    # Seeds by the command's place in the full list: the same kills with or without --commands.
    for number, cmd in [(i, c) for i, c in enumerate(commands(inputs)) if c.name in wanted]:
        reference, seconds, clean_diff = references(cmd, args.work)
        # Attributes that differ between two clean runs are not results: excluded, named.
        # A file that differs byte for byte between them cannot be excluded: reported.
        keys = {d.split(":")[0] for d in clean_diff}
        files = sorted(k for k in keys if ("." in k or k.startswith("/")) and "@" not in k)
        exclude = cmd.exclude + sorted(keys - set(files))
        if files:
            print(f"{cmd.name}: two uninterrupted runs differ in {', '.join(files)}", flush=True)
        rng = np.random.default_rng([args.seed, number])
        done: list[dict] = []
        # Until --runs kills have landed mid-run (a run that ends before its kill is drawn
        # again), at most three times as many starts.
        while sum(t["interrupted"] for t in done) < args.runs and len(done) < 3 * args.runs:
            delay = float(rng.uniform(0.0, seconds))
            done.append(trial(cmd, args.work, len(done), delay, reference, exclude,
                              budget=max(600, 20 * seconds)))
            if args.json:  # every trial as it ends: a campaign cut short still counts
                with open(args.json.with_suffix(".trials.jsonl"), "a") as sink:
                    sink.write(json.dumps(done[-1]) + "\n")
            if not done[-1]["interrupted"]:  # the machine got faster: draw over this run
                seconds = min(seconds, done[-1]["ran_s"])
        trials += done
        interrupted = sum(t["interrupted"] for t in done)
        survived = sum(t["survived"] for t in done if t["interrupted"])
        rows.append({"command": cmd.name, "reference_s": round(seconds, 1), "runs": len(done),
                     "interrupted": interrupted, "survived": survived,
                     "excluded": exclude,
                     "failures": [f"#{t['trial']} at {t['kill_after_s']} s: {t['why']}"
                                  for t in done if not t["survived"]]})
        print(f"{cmd.name}: {survived}/{interrupted} interrupted runs survived "
              f"({len(done) - interrupted} had finished before the kill); reference "
              f"{seconds:.1f} s; excluded: {', '.join(exclude) or 'nothing'}", flush=True)
    print("\n| command | reference run (s) | killed mid-run / started | survived | excluded "
          "from the comparison |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['reference_s']} | {r['interrupted']} / {r['runs']} | "
              f"{r['survived']} / {r['interrupted']} | {', '.join(r['excluded']) or '-'} |")
    for r in rows:
        for failure in r["failures"]:
            print(f"- {r['command']} {failure}")
    if args.json:
        args.json.write_text(json.dumps({"summary": rows, "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
