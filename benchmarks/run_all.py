"""Run every benchmark of the project and rewrite benchmarks/RESULTS.md with its figures.

    python benchmarks/run_all.py [--quick] [--only decode,search,...]

Each benchmark is a script here that prints its own figures (ratios measured in one run
where it compares two things); this runner records the machine, the date, the exact
command and its output.

Nothing already in RESULTS.md is lost: a section (``## name``) is rewritten only when its
benchmark runs, and then only between its marker comments
``<!-- run_all:name -->`` ... ``<!-- /run_all:name -->``; notes written around them stay.
A section without markers (written by hand) keeps its text below the new block.
Sections of benchmarks not run (``--only``), of other scripts (serve, search at 10M ...)
and the "GPU" section (benchmarks/gpu.sh on a machine with a GPU) are kept as they are,
in their order; a benchmark's first section goes before "GPU".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: name -> (script, arguments for a full run, arguments for --quick)
BENCHMARKS = {
    "decode": ("bench_decode.py", ["--repeat", "2"], ["--repeat", "1"]),
    "adapt": ("bench_adapt.py", [], ["--quick"]),
    "encode": ("bench_encode.py", [], ["--images", "32", "--repeat", "3", "--models", "cxr-tiny"]),
    "search": ("bench_search.py", [], ["--sizes", "112120", "--queries", "200", "--single", "20"]),
    "fewshot": ("bench_fewshot.py", [], ["--quick"]),
    "serve": ("bench_serve.py", [], ["--images", "20000", "--requests", "20", "--image-requests", "2"]),
    "fewshot-demo": ("bench_fewshot.py", ["--rows", "2000", "--no-paper"],
                     ["--rows", "2000", "--no-paper", "--quick"]),
    "linear": ("bench_linear.py", [], ["--draws", "2"]),
    "centring": ("bench_centring.py", [], ["--images", "600"]),
}


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, GPU: {gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """RESULTS.md as its header and ``(name, section text)`` pairs, in order; a section
    runs from its ``## name`` line to the next one (the name is the heading's first word,
    so ``## fewshot — FAILED (exit 1)`` is the fewshot section)."""
    parts = re.split(r"(?m)^(?=## )", text)
    header = parts[0] if parts and not parts[0].startswith("## ") else ""
    sections = [(p[3:].split(None, 1)[0] if p[3:].strip() else "", p)
                for p in parts if p.startswith("## ")]
    return header, sections


def marked(name: str, block: str) -> str:
    return f"<!-- run_all:{name} -->\n{block.rstrip()}\n<!-- /run_all:{name} -->\n"


def merge_results(old: str, header: str, blocks: dict[str, tuple[str, str]]) -> str:
    """The new RESULTS.md: ``header``, then every old section in its order with the
    blocks of the benchmarks run (``{name: (heading, block)}``) put between their markers,
    then the sections new to the file (before "GPU", kept last)."""
    _, sections = split_sections(old)
    out, done = [], set()
    for name, text in sections:
        if name not in blocks:
            out.append(text)
            continue
        heading, block = blocks[name]
        done.add(name)
        body = text.split("\n", 1)[1] if "\n" in text else ""
        pattern = re.compile(rf"<!-- run_all:{re.escape(name)} -->.*?"
                             rf"<!-- /run_all:{re.escape(name)} -->\n?", re.S)
        if pattern.search(body):
            body = pattern.sub(lambda _: marked(name, block), body, count=1)
        else:  # written by hand: its text kept below the new block
            body = "\n" + marked(name, block) + body
        out.append(f"## {heading}\n{body}")
    new = [f"## {blocks[n][0]}\n\n{marked(n, blocks[n][1])}\n" for n in blocks
           if n not in done]
    gpu = [i for i, (name, _) in enumerate(sections) if name == "GPU"]
    at = len(out) - 1 if gpu and gpu[-1] == len(sections) - 1 else len(out)
    out[at:at] = new
    if not gpu:
        out.append("## GPU\n\nNo GPU figures recorded yet: run `bash benchmarks/gpu.sh` on a "
                   "machine with a CUDA GPU and paste its output here.\n")
    text = header.rstrip() + "\n\n" + "".join(
        t if t.endswith("\n\n") else t.rstrip("\n") + "\n\n" for t in out)
    return text.rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; expected some of: "
                     f"{', '.join(BENCHMARKS)}")
    results_path = HERE / "RESULTS.md"
    old = results_path.read_text() if results_path.exists() else ""

    blocks = {}
    for name in names:
        script, full, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - start
        output = (proc.stdout + ("\n" + proc.stderr if proc.returncode else "")).strip()
        print(output, flush=True)
        status = "" if proc.returncode == 0 else f" — FAILED (exit {proc.returncode})"
        blocks[name] = (f"{name}{status}", f"`python benchmarks/{script} {' '.join(cmd[2:])}` "
                        f"({took:.0f} s, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, load "
                        f"average {load:.1f} before on {os.cpu_count()} cores)\n\n```\n"
                        f"{output}\n```")

    header = (f"# Benchmark results\n\nLast written by `python benchmarks/run_all.py"
              f"{' --quick' if args.quick else ''}{' --only ' + args.only if args.only else ''}`"
              f" on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} (sections it did not run are "
              f"kept as they were).\n\nMachine: {machine()}.\n\nEvery comparison is a ratio "
              "of two figures measured in the same run. Figures on a shared 2-core machine "
              "move by ±10-20% between runs.\n")
    results_path.write_text(merge_results(old, header, blocks))
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
