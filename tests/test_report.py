"""The report from the results a user has (no demo): a store, a few-shot folder and
evaluate JSON, given one by one or as a folder; what it found and did not; corrupt files
named; embedding health; the `report` command in a real process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import pytest
from test_fewshot import planted, write_store

from cxrembed.compare import published_per_class
from cxrembed.errors import DataError
from cxrembed.fewshot import evaluate_adapted_head, evaluate_zeroshot, run_fewshot
from cxrembed.report import write_report


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """The README's step-by-step route on a planted store: encode, fewshot, evaluate."""
    root = tmp_path_factory.mktemp("route")
    write_store(root / "store.h5", planted(n=1200), head=True)
    run_fewshot(root / "store.h5", out=root / "fewshot", shots=(1, 2), seeds=2,
                heads=("linear", "knn", "zeroshot"), bootstrap=20, progress=False)
    evaluate_zeroshot(root / "store.h5", bootstrap=20).save(root / "eval" / "zs.json")
    evaluate_adapted_head(root / "store.h5", bootstrap=0).save(root / "eval" / "head.json")
    return root


def _table_cells(page: str) -> list[str]:
    return re.findall(r"<td[^>]*>([^<]*)</td>", page)


def test_report_of_a_store_a_fewshot_folder_and_evaluate_json(route, tmp_path):
    report = write_report([route / "store.h5", route / "fewshot", route / "eval" / "zs.json",
                           route / "eval" / "head.json"], tmp_path / "r.html")
    page = report.path.read_text(encoding="utf-8")
    assert [kind for kind, _ in report.found] == [
        "few-shot result", "zeroshot result", "adapted-head result", "embedding store"]
    # Every mean shown is the one its JSON holds; published cells come from Table 1.
    cells = _table_cells(page)
    for name in ("zs.json", "head.json"):
        saved = json.loads((route / "eval" / name).read_text())
        assert f"{saved['mean_auc']:.3f}" in cells, name
    fewshot = json.loads((route / "fewshot" / "fewshot.json").read_text())
    linear_2 = next(r for r in fewshot["summary"] if r["head"] == "linear" and r["shots"] == 2)
    assert f"{linear_2['mean_auc']['mean']:.3f}" in cells
    assert f"{published_per_class()['CheXzero']['Atelectasis']:.3f}" in cells
    assert "could not be read" not in page and "E1 = synthetic" not in page
    assert "<b>E1</b> = synthetic" in page  # columns labelled by encoder
    for section in ("Embedding stores", "Per-class test AUC", "Few-shot heads",
                    "ROC curves: adapted head"):
        assert section in page, section
    # Said on the page (and returned for the terminal): what was not found.
    assert any(m.startswith("adaptation curves") for m in report.missing)
    assert any("demo" in m for m in report.missing)
    assert "Not found" in page and "adaptation curves: no `cxrembed adapt --out`" in page
    assert "not recorded" in page  # this store has no embedding_health record


def test_a_scanned_folder_gives_the_same_report_and_lists_what_it_ignored(route, tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(route, folder)
    (folder / "notes.json").write_text(json.dumps({"mine": 1}))
    with h5py.File(folder / "pixels.h5", "w") as f:
        f.attrs["format"] = 1  # a pixel cache's format attribute
    report = write_report(folder)
    assert report.path == folder / "report.html"
    assert sorted(kind for kind, _ in report.found) == sorted(
        ["few-shot result", "zeroshot result", "adapted-head result", "embedding store"])
    ignored = {p.name: why for p, why in report.ignored}
    assert set(ignored) == {"notes.json", "pixels.h5"}
    assert "not a cxrembed result" in ignored["notes.json"]


def test_a_corrupt_json_is_an_error_naming_it(route, tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(route, folder)
    broken = folder / "eval" / "zs.json"
    broken.write_text(broken.read_text()[:-40])  # truncated, as by a full disk
    with pytest.raises(DataError, match=re.escape(str(broken)) + ".*not valid JSON"):
        write_report(folder)
    with pytest.raises(DataError, match=re.escape(str(broken))):
        write_report([folder / "store.h5", broken])
    assert not (folder / "report.html").exists()


def test_a_corrupt_run_metrics_line_is_named_and_a_run_is_shown(route, tmp_path):
    run = tmp_path / "adapt"
    run.mkdir()
    epochs = [{"epoch": e, "train_loss": 1.0 / e, "val_mean_auc": 0.5 + e / 20,
               "val_auc": {"Edema": 0.6}} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (run / "config.json").write_text(json.dumps({"config": {"model": "cxr-tiny", "epochs": 10}}))
    (run / "summary.json").write_text(json.dumps({"best_epoch": 3, "epochs_run": 3,
                                                  "stopped_early": True, "test_mean_auc": 0.61}))
    report = write_report([run, route / "eval" / "zs.json"], tmp_path / "r.html")
    page = report.path.read_text(encoding="utf-8")
    assert ("adaptation run", str(run)) in report.found
    assert "Best val epoch 3 of 3 run (at most 10); stopped early" in page
    (run / "metrics.jsonl").write_text(json.dumps(epochs[0]) + "\n{\"epoch\": 2,\n")
    with pytest.raises(DataError, match=re.escape(str(run / "metrics.jsonl")) + ", line 2"):
        write_report([run], tmp_path / "r.html")


def test_collapsed_store_is_marked_and_skipped_images_counted(route, tmp_path):
    store = tmp_path / "store.h5"
    shutil.copy(route / "store.h5", store)
    with h5py.File(store, "r+") as f:
        f.attrs["embedding_health"] = json.dumps({"mean_cosine": 0.997, "effective_rank": 1.3,
                                                  "sample_size": 512})
        f.attrs["skipped_images"] = json.dumps([{"image_id": "x.png", "reason": "truncated"}])
    report = write_report([store], tmp_path / "r.html")
    page = report.path.read_text(encoding="utf-8")
    assert "1 image skipped" in page
    assert "<td class=warn>0.997</td><td class=warn>1.3</td>" in page
    assert "card warn" in page and report.warnings and "0.997" in report.warnings[0]
    with h5py.File(store, "r+") as f:
        f.attrs["embedding_health"] = json.dumps({"mean_cosine": 0.21, "effective_rank": 24.0,
                                                  "collapsed": False})
    page = write_report([store], tmp_path / "r.html").path.read_text(encoding="utf-8")
    assert "<td>0.210</td><td>24.0</td>" in page and "card warn" not in page


@pytest.mark.slow  # a fresh interpreter imports torch, sklearn, matplotlib
def test_report_leaves_the_matplotlib_backend_alone(route, tmp_path):
    code = ("import sys, matplotlib; matplotlib.use('svg');"
            "from cxrembed.report import write_report;"
            f"write_report([{str(route / 'store.h5')!r}, {str(route / 'fewshot')!r}],"
            f" {str(tmp_path / 'r.html')!r});"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]


@pytest.mark.slow
def test_report_command_says_what_it_found_and_names_a_broken_file(route, tmp_path):
    cmd = [sys.executable, "-m", "cxrembed", "report", str(route / "fewshot"),
           str(route / "eval" / "zs.json"), "--out", str(tmp_path / "r.html")]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "found: few-shot result" in done.stderr and "found: zeroshot result" in done.stderr
    assert "not found: adaptation curves" in done.stderr
    assert (tmp_path / "r.html").is_file() and "wrote" in done.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "cxrembed.eval", ')
    done = subprocess.run(cmd[:4] + [str(broken)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "broken.json" in done.stderr and "not valid JSON" in done.stderr
    done = subprocess.run(cmd[:4] + [str(tmp_path / "nothing-here")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 1 and "does not exist" in done.stderr
