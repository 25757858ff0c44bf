"""The demo end to end on a small twin, through the `cxrembed demo` command: every number
the report shows comes from the run's own JSON files, and nothing there is chosen by test
AUC; `cxrembed report` renders the same folder, and its parts one by one."""

from __future__ import annotations

import json
import re
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cxrembed.demo import DemoConfig
from cxrembed.errors import ConfigError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "cxrembed", "demo", "--out", str(out),
                           "--images", "240", "--size", "64", "--epochs", "1", "--seeds", "2",
                           "--shots", "1,4", "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    return SimpleNamespace(out=out, steps=summary["steps"], summary=summary,
                           stderr=done.stderr)


@pytest.mark.slow
def test_demo_writes_every_step_and_the_report(demo_run):
    out = demo_run.out
    names = [s["name"] for s in demo_run.steps]
    assert names[:3] == ["synthetic NIH twin", "pixel cache", "domain adaptation"]
    assert "few-shot sweep" in names and names[-1] == "HTML report"
    for path in ("report.html", "summary.json", "adapt/metrics.jsonl", "adapt/model.safetensors",
                 "store-frozen.h5", "store-adapted.h5", "fewshot/fewshot.json",
                 "thumbnails.json"):
        assert (out / path).exists(), path
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # self-contained
    assert f"Report: {out / 'report.html'}" in demo_run.stderr.replace("\n", "")


@pytest.mark.slow
def test_report_numbers_trace_back_to_the_runs_json(demo_run):
    out = demo_run.out
    summary = demo_run.summary
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


@pytest.mark.slow
def test_nothing_is_chosen_by_test_auc(demo_run):
    fewshot_rows = [n for n in demo_run.summary["protocols"] if n.startswith("few-shot")]
    assert len(fewshot_rows) == 4  # every trained head, not the best one
    html = (demo_run.out / "report.html").read_text()
    # The ROC drawn is the adapted head's, of the one store that has a head.
    assert html.count("<h2>ROC curves: adapted head") == 1
    assert f"{demo_run.out / 'store-adapted.h5'}</span></h2>" in html


@pytest.mark.slow
def test_report_command_on_the_demo_folder_and_on_its_parts(demo_run, tmp_path):
    out = demo_run.out
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "cxrembed", "report", str(out), "--out",
                           str(tmp_path / "all.html")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for line in ("found: demo summary", "found: adaptation run", "found: embedding store",
                 "found: few-shot result", "found: zeroshot result",
                 "found: adapted-head result"):
        assert line in done.stderr, line
    assert "ignored: " + str(out / "pixels.h5") in done.stderr
    assert "not found" not in done.stderr  # a demo folder has every input
    page = (tmp_path / "all.html").read_text()
    # Zero-shot on each encoder, every column named by its encoder.
    labels = re.findall(r"<th>zeroshot<br><span class=sub>(E\d)[^<]*</span>", page)
    assert sorted(set(labels)) == ["E1", "E2"]  # one twice: eval JSON and the sweep's row
    encoders = dict(re.findall(r"<li><b>(E\d)</b> = ([^<]*?) <span", page))
    assert sorted(encoders.values()) == ["cxr-tiny adapted (adapt)", "cxr-tiny random init"]
    # Each store's embedding health, as the encode recorded it.
    from cxrembed.store import EmbeddingStore

    for name in ("store-frozen.h5", "store-adapted.h5"):
        with EmbeddingStore.open(out / name) as store:
            health = store.attrs["embedding_health"]
        cells = f"{health['mean_cosine']:.3f}</td><td{' class=warn' * health['collapsed']}>" \
                f"{health['effective_rank']:.1f}</td>"
        assert cells in page, name
    # The step-by-step route: the same parts, no demo summary.
    parts = [out / "adapt", out / "store-adapted.h5", out / "fewshot",
             out / "eval" / "adapted-head.json"]
    done = subprocess.run([sys.executable, "-m", "cxrembed", "report", *map(str, parts),
                           "--out", str(tmp_path / "parts.html")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "not found: pipeline steps" in done.stderr
    page = (tmp_path / "parts.html").read_text()
    assert "Domain adaptation" in page and "Few-shot heads" in page
    head = json.loads((out / "eval" / "adapted-head.json").read_text())
    assert f"<td class='best'>{head['mean_auc']:.3f}</td>" in page or \
        f"<td class=''>{head['mean_auc']:.3f}</td>" in page


def test_demo_refuses_a_data_folder_that_is_not_there(tmp_path):
    from cxrembed.demo import check_config

    with pytest.raises(ConfigError, match="--data"):
        check_config(DemoConfig(data=str(tmp_path / "nope")))


def test_reused_steps_say_so_with_the_time_they_took(tmp_path):
    from cxrembed.demo import _previous_step_times, _Steps, format_step_time

    first = _Steps(None)
    first.run("pixel cache", "cxrembed cache", lambda: None)
    first.records[0]["seconds"] = 12.34
    (tmp_path / "summary.json").write_text(json.dumps({"steps": first.records}))
    lines = []
    again = _Steps(lines.append, _previous_step_times(tmp_path))
    again.run("pixel cache", "cxrembed cache", lambda: None, reused=True)
    again.run("few-shot sweep", "cxrembed fewshot", lambda: None, reused=True)
    assert [format_step_time(s) for s in again.records] == [
        "reused (12.3 s when run)", "reused"]
    assert "reusing" in lines[0]
    # A third run keeps the time of the run that did the work, not the reused 0.0 s.
    (tmp_path / "summary.json").write_text(json.dumps({"steps": again.records}))
    assert _previous_step_times(tmp_path) == {"pixel cache": 12.34}
    assert format_step_time({"seconds": 3.21, "reused": False}) == "3.2 s"


@pytest.mark.slow
def test_a_second_demo_run_reuses_and_says_so(demo_run):
    from cxrembed.demo import DemoConfig, run_demo

    first = {s["name"]: s for s in demo_run.steps}
    assert not any(s["reused"] for s in first.values())
    again = run_demo(demo_run.out, DemoConfig(images=240, size=64, epochs=1, seeds=2,
                                              shots=(1, 4)), progress=False)
    steps = {s["name"]: s for s in again.steps}
    for name in ("pixel cache", "domain adaptation", "encode (frozen CLIP)",
                 "encode (adapted)"):
        assert steps[name]["reused"], name
        assert steps[name]["original_seconds"] == first[name]["seconds"], name
    html = (demo_run.out / "report.html").read_text()
    for name in ("pixel cache", "domain adaptation", "encode (adapted)"):
        shown = f"reused ({first[name]['seconds']:.1f} s when run)"
        assert re.search(rf"<td>{re.escape(name)}</td><td[^>]*>{re.escape(shown)}</td>", html)


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows (1.0: every vector points the same way)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(unit)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


@pytest.mark.slow
def test_demo_adaptation_learns_over_epochs_and_spreads_the_vectors(tmp_path):
    """The demo's own adaptation settings on the demo's default twin: val AUC climbs for
    several epochs (not a peak at epoch 1) and the adapted vectors are not the random
    encoder's near-identical ones, so its search shows neighbours that differ."""
    import torch

    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.data import load_nih
    from cxrembed.data.cache import ImageSource, build_pixel_cache
    from cxrembed.data.synth import make_twin
    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.model import load_encoder

    config = DemoConfig()
    root = make_twin(tmp_path / "nih", images=config.images, size=config.size, seed=config.seed)
    dataset = load_nih(root, val_fraction=config.split_val_fraction)
    build_pixel_cache(dataset, tmp_path / "pixels.h5", progress=False)
    result = adapt(dataset, tmp_path / "adapt", AdaptConfig.from_dict(
        config.adapt_overrides("cpu")), pixel_cache=tmp_path / "pixels.h5", device="cpu",
        progress=False)
    curve = [round(h["val_mean_auc"], 4) for h in result.history]
    assert result.best_epoch >= 4, curve
    assert result.val_mean_auc >= curve[0] + 0.03, curve

    rows = np.sort(np.random.default_rng(0).choice(len(dataset), 300, replace=False))
    images = to_clip_tensor(ImageSource(dataset, tmp_path / "pixels.h5").read(rows))
    cosines = {}
    for name, encoder in (("frozen", load_encoder(config.model, config.pretrained)),
                          ("adapted", load_encoder(checkpoint=tmp_path / "adapt"))):
        with torch.inference_mode():
            cosines[name] = mean_pairwise_cosine(encoder.encode_image(images).numpy())
    assert cosines["frozen"] > 0.99  # a random tiny CLIP: every X-ray looks alike to it
    assert cosines["adapted"] < 0.98, cosines
