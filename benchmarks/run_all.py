"""Run every benchmark of the project and rewrite benchmarks/RESULTS.md with its figures.

    python benchmarks/run_all.py [--quick] [--only decode,search,...]

Each benchmark is a script here that prints its own figures (ratios measured in one run
where it compares two things); this runner records the machine, the date, the exact
command and its output. GPU figures come from benchmarks/gpu.sh on a machine with a GPU
and are kept from the existing RESULTS.md section "GPU".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: name -> (script, arguments for a full run, arguments for --quick)
BENCHMARKS = {
    "decode": ("bench_decode.py", [], ["--repeat", "1"]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    results_path = HERE / "RESULTS.md"
    old = results_path.read_text() if results_path.exists() else ""
    gpu_section = old[old.index("## GPU"):] if "## GPU" in old else (
        "## GPU\n\nNo GPU figures recorded yet: run `bash benchmarks/gpu.sh` on a machine with "
        "a CUDA GPU and paste its output here.\n")

    sections = []
    for name in names:
        script, full, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - start
        output = (proc.stdout + ("\n" + proc.stderr if proc.returncode else "")).strip()
        print(output, flush=True)
        status = "" if proc.returncode == 0 else f" — FAILED (exit {proc.returncode})"
        sections.append(f"## {name}{status}\n\n`python benchmarks/{script} "
                        f"{' '.join(cmd[2:])}` ({took:.0f} s)\n\n```\n{output}\n```\n")

    text = (f"# Benchmark results\n\nWritten by `python benchmarks/run_all.py"
            f"{' --quick' if args.quick else ''}` on "
            f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.\n\nMachine: {machine()}.\n\n"
            "Every comparison is a ratio of two figures measured in the same run. Figures "
            "on a shared 2-core machine move by ±10-20% between runs.\n\n"
            + "\n".join(sections) + "\n" + gpu_section)
    results_path.write_text(text)
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
