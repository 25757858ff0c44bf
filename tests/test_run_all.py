"""benchmarks/run_all.py rewrites RESULTS.md without losing what it did not regenerate."""

from __future__ import annotations

import pytest

OLD = """# Benchmark results

Written by an older run.

## decode

<!-- run_all:decode -->
`python benchmarks/bench_decode.py` (10 s)

```
decode 9.3 images/s
```
<!-- /run_all:decode -->

Note on decode: the cache reaches 0.95 of the decode-only rate.

## fewshot

Figures pasted by hand: old 74.9 s, new 70.0 s.

## serve

id p50 64 ms (bench_serve.py, run by hand; run_all does not run it here)

## GPU

H200: 5,000 images/s.
"""


@pytest.fixture(scope="module")
def run_all(benchmark_script):
    return benchmark_script("run_all")


def test_only_the_blocks_run_are_replaced_and_every_other_figure_is_kept(run_all):
    blocks = {"decode": ("decode", "decode 12.0 images/s"),
              "fewshot": ("fewshot", "wall 30.0 s"),
              "linear": ("linear", "340x sklearn")}
    new = run_all.merge_results(OLD, "# Benchmark results\n\nnew header\n", blocks)
    assert "decode 9.3" not in new and "decode 12.0 images/s" in new
    assert "Note on decode: the cache reaches 0.95" in new  # a note beside the markers
    assert "Figures pasted by hand: old 74.9 s" in new  # hand-written: kept, below
    assert new.index("wall 30.0 s") < new.index("Figures pasted by hand")
    assert "id p50 64 ms (bench_serve.py" in new and "H200: 5,000 images/s." in new
    headings = [line for line in new.splitlines() if line.startswith("## ")]
    assert headings == ["## decode", "## fewshot", "## serve", "## linear", "## GPU"]
    assert new.startswith("# Benchmark results\n\nnew header\n") and "older run" not in new
    # a second run with new figures replaces its own block again and nothing else
    again = run_all.merge_results(new, "# Benchmark results\n\nnew header\n",
                                  {"fewshot": ("fewshot", "wall 20.0 s")})
    assert "wall 30.0 s" not in again and again.count("wall 20.0 s") == 1
    assert again.count("Figures pasted by hand") == 1 and "decode 12.0 images/s" in again
    assert run_all.merge_results(again, "# Benchmark results\n\nnew header\n", {}) == again


def test_a_failed_benchmark_keeps_its_section_and_a_new_file_gets_a_gpu_section(run_all):
    failed = run_all.merge_results(OLD, "# R\n", {"decode": ("decode — FAILED (exit 1)",
                                                              "Traceback ...")})
    assert "## decode — FAILED (exit 1)" in failed and "Note on decode" in failed
    name, _ = run_all.split_sections(failed)[1][0]
    assert name == "decode"
    fresh = run_all.merge_results("", "# R\n", {"adapt": ("adapt", "10 img/s")})
    assert [line for line in fresh.splitlines() if line.startswith("## ")] == ["## adapt",
                                                                                 "## GPU"]
