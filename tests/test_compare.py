"""compare: the shipped Table 1 (checked against the paper's text and its printed means),
columns as fields labelled by encoder, and refusal of results on different test sets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from test_fewshot import planted, write_store

from cxrembed.compare import (METHODS, PAPER, PUBLISHED_MEAN, compare_results,
                              load_published_table, published_per_class)
from cxrembed.errors import DataError
from cxrembed.fewshot import evaluate_zeroshot
from cxrembed.labels import LABELS, canonical
from cxrembed.published import mean_of_table

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper.txt"


def test_shipped_table1_means_are_the_printed_means():
    table = published_per_class()
    assert list(table) == list(METHODS)
    assert all(set(table[m]) == set(LABELS) for m in METHODS)  # 14 x 5, no gap
    printed = {"CheXzero": 0.706, "ImCLIP": 0.564, "CXR-CLIP": 0.719, "MoCoCLIP": 0.749,
               PAPER: 0.750}
    assert PUBLISHED_MEAN == printed
    for method in METHODS:
        # Rounding rule: exact decimal mean of the 14 cells, half up to 3 decimals. No mean
        # lies on a tie, so half-even or float rounding would give the same figures.
        exact = sum(Decimal(repr(v)) for v in table[method].values()) / 14
        assert abs(exact * 1000 % 1 - Decimal("0.5")) > Decimal("0.01"), method
        assert mean_of_table(table[method]) == printed[method], method
    assert table["CheXzero"]["Atelectasis"] == 0.758 and table[PAPER]["Hernia"] == 0.855


def test_shipped_table1_is_the_papers_text_cell_by_cell():
    if not PAPER_TEXT.is_file():
        pytest.skip("../shared/paper is absent (a fresh clone has no paper text)")
    lines = PAPER_TEXT.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Pathology\t"))
    assert lines[start].split("\t")[1:] == ["CheXZero", "ImCLIP", "CXRCCLIP", "MoCoCLIP",
                                            "My Version"]  # the paper's spellings
    table = published_per_class()
    for line in lines[start + 1:start + 15]:
        name, *cells = line.split("\t")
        assert [table[m][canonical(name)] for m in METHODS] == [float(c) for c in cells], name
    average = lines[start + 15].split("\t")
    assert average[0] == "Average AUC"
    assert [PUBLISHED_MEAN[m] for m in METHODS] == [float(c) for c in average[1:]]


@pytest.mark.slow
def test_table1_ships_in_the_wheel(tmp_path):
    import shutil

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"  # build a copy: the
    shutil.copytree(root / "cxrembed", src / "cxrembed",  # checkout gets no build/
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import zipfile

    wheel = next(tmp_path.glob("cxrembed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cxrembed/published/table1.csv" in names
    assert "cxrembed/model/configs/cxr-tiny.json" in names  # the architecture the demo uses


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Zero-shot results: two on one store's test set, one on a smaller world's."""
    tmp = tmp_path_factory.mktemp("cmp")
    write_store(tmp / "a.h5", planted())
    write_store(tmp / "b.h5", planted(n=1000, seed=1))
    a = evaluate_zeroshot(tmp / "a.h5", bootstrap=0).save(tmp / "a.json")
    b = evaluate_zeroshot(tmp / "b.h5", bootstrap=0).save(tmp / "b.json")
    other = json.loads(a.read_text())  # the same test set, another encoder
    other["source"]["fingerprint"] = {"model": "synthetic", "weights": {"kind": "run"}}
    other["source"]["run"] = "/runs/adapted-7"
    (tmp / "a2.json").write_text(json.dumps(other))
    return tmp


def test_columns_are_fields_labelled_by_encoder(results):
    comparison = compare_results([results / "a.json", results / "a2.json"])
    cols = comparison.ours
    assert [(c.method, c.shots, c.encoder, c.published) for c in cols] == [
        ("zeroshot", None, "E1", False), ("zeroshot", None, "E2", False)]
    assert [e.label for e in comparison.encoders] == ["synthetic",
                                                      "synthetic adapted (adapted-7)"]
    assert comparison.encoders[0].stores == [str(results / "a.h5")]
    assert [c.method for c in comparison.published] == list(METHODS)
    assert cols[0].eval_set == json.loads((results / "a.json").read_text())["source"]["eval_set"]
    assert cols[0].eval_set["n"] == json.loads((results / "a.json").read_text())["n_rows"]
    assert not comparison.warnings
    saved = comparison.to_dict()
    assert saved["columns"][5]["encoder"] == "E1" and saved["columns"][5]["method"] == "zeroshot"


def test_results_on_different_test_sets_are_refused_unless_allowed(results):
    with pytest.raises(DataError, match=r"different test sets.*--allow-mixed") as err:
        compare_results([results / "a.json", results / "b.json"])
    n_a = json.loads((results / "a.json").read_text())["n_rows"]
    n_b = json.loads((results / "b.json").read_text())["n_rows"]
    assert f"{n_a} test images" in str(err.value) and f"{n_b} test images" in str(err.value)
    comparison = compare_results([results / "a.json", results / "b.json"], allow_mixed=True)
    assert [c.eval_set_id for c in comparison.ours] == ["T1", "T2"]
    assert [c.name for c in comparison.ours] == ["zeroshot [E1, T1]", "zeroshot [E1, T2]"]
    assert any("mixed test sets" in w for w in comparison.warnings)


def test_same_size_but_other_images_is_refused(results):
    moved = json.loads((results / "a.json").read_text())
    moved["source"]["eval_set"]["ids_sha256"] = "0" * 64  # same split and size, other ids
    with pytest.raises(DataError, match="different test sets"):
        compare_results([results / "a.json", moved])


def test_results_without_a_set_record_are_checked_by_size_and_said_so(results):
    old = json.loads((results / "b.json").read_text())
    del old["source"]["eval_set"]  # written before cxrembed recorded it
    with pytest.raises(DataError, match="different test sets"):
        compare_results([results / "a.json", old])
    comparison = compare_results([old])
    assert any("checked by split and size only" in w for w in comparison.warnings)


@pytest.mark.slow  # a fresh interpreter imports torch, sklearn, matplotlib
def test_cli_refuses_mixed_sets_with_one_line_and_allows_them_on_request(results, tmp_path):
    args = [sys.executable, "-m", "cxrembed", "compare", str(results / "a.json"),
            str(results / "b.json"), "--out", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--allow-mixed" in done.stderr and not (tmp_path / "comparison.json").exists()
    done = subprocess.run(args + ["--allow-mixed"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and "mixed test sets" in done.stderr  # the console
    assert re.search(r"E1 = synthetic", done.stderr)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [s["id"] for s in saved["eval_sets"]] == ["T1", "T2"]


def test_compare_refuses_what_is_not_a_result(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a cxrembed result of the kind expected"):
        compare_results([tmp_path / "other.json"])
    with pytest.raises(DataError, match="no result at"):
        compare_results([tmp_path / "missing"])


def test_compare_takes_another_published_per_class_table(tmp_path):
    result = {"format": "cxrembed.eval", "protocol": "zeroshot", "mean_auc": 0.6,
              "split": "test", "n_rows": 10, "auc": {c: 0.6 for c in LABELS}}
    table = tmp_path / "table1.csv"
    # Made-up values: the test checks the plumbing, not the paper.
    table.write_text("class,CheXzero,paper\nAtelectasis,0.61,0.72\nPleural_Thickening,,0.70\n")
    comparison = compare_results([result], published=table)
    rows = {r["class"]: r for r in comparison.table1()}
    assert rows["Atelectasis"]["CheXzero (published)"] == 0.61
    assert rows["Atelectasis"]["Dalsania 2025 (published)"] == 0.72
    assert rows["Pleural Thickening"]["CheXzero (published)"] is None  # empty cell
    assert rows["Edema"]["Dalsania 2025 (published)"] is None  # absent row
    assert comparison.to_dict()["published_source"] == str(table)
    default = {r["class"]: r for r in compare_results([result]).table1()}
    assert default["Edema"]["Dalsania 2025 (published)"] == 0.815  # the shipped table
    table.write_text("class,NewMethod\nAtelectasis,0.6\n")
    with pytest.raises(DataError, match="unknown method column 'NewMethod'"):
        load_published_table(table)
    table.write_text("class,CheXzero\nAtelectasis,1.7\n")
    with pytest.raises(DataError, match=r"row 2, column 'CheXzero': '1.7'"):
        load_published_table(table)
    table.write_text("class,CheXzero\nCovid,0.6\n")
    with pytest.raises(DataError, match="row 2.*'Covid'"):
        load_published_table(table)
