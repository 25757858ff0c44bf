"""The demo end to end on a small twin: every number the report shows comes from the run's
own JSON files, and nothing there is chosen by test AUC."""

from __future__ import annotations

import json

import pytest

from cxrembed.demo import DemoConfig, run_demo
from cxrembed.errors import ConfigError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(images=240, size=64, epochs=1, seeds=2, shots=(1, 4))
    return run_demo(out, config, progress=False)


def test_demo_writes_every_step_and_the_report(demo_run):
    out = demo_run.out
    names = [s["name"] for s in demo_run.steps]
    assert names[:3] == ["synthetic NIH twin", "pixel cache", "domain adaptation"]
    assert "few-shot sweep" in names and names[-1] == "HTML report"
    for path in ("report.html", "summary.json", "adapt/metrics.jsonl", "adapt/model.safetensors",
                 "store-frozen.h5", "store-adapted.h5", "fewshot/fewshot.json", "roc.json"):
        assert (out / path).exists(), path
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # self-contained


def test_report_numbers_trace_back_to_the_runs_json(demo_run):
    out = demo_run.out
    summary = json.loads((out / "summary.json").read_text())
    html = (out / "report.html").read_text()
    for name, protocol in summary["protocols"].items():
        source = json.loads((out / protocol["source"]).read_text())
        if source.get("format") == "cxrembed.eval":
            assert protocol["mean"] == source["mean_auc"], name
            assert protocol["per_class"] == list(source["auc"].values()), name
        else:  # a few-shot head at the largest shot count
            head, shots = name.split()[1].rstrip(","), int(name.split()[2].split("-")[0])
            row = next(r for r in source["summary"]
                       if r["head"] == head and r["shots"] == shots)
            assert protocol["mean"] == row["mean_auc"]["mean"], name
        assert f"{protocol['mean']:.3f}" in html, name


def test_nothing_is_chosen_by_test_auc(demo_run):
    summary = json.loads((demo_run.out / "summary.json").read_text())
    fewshot_rows = [n for n in summary["protocols"] if n.startswith("few-shot")]
    assert len(fewshot_rows) == 4  # every trained head, not the best one
    assert json.loads((demo_run.out / "roc.json").read_text())["protocol"] == "adapted head"


def test_demo_refuses_a_data_folder_that_is_not_there(tmp_path):
    from cxrembed.demo import check_config

    with pytest.raises(ConfigError, match="--data"):
        check_config(DemoConfig(data=str(tmp_path / "nope")))
