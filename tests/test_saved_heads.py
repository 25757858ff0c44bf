"""`fit`: the sweep's own head, saved and loaded back; calibration from val only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_fewshot import FAST, planted, write_store

from cxrembed.errors import ConfigError
from cxrembed.fewshot import run_fewshot
from cxrembed.fewshot.fit import fit_head
from cxrembed.heads.saved import load_head
from cxrembed.store import EmbeddingStore


@pytest.fixture(scope="module")
def world():
    return planted(n=1500, seed=3)


@pytest.fixture(scope="module")
def store_path(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.h5"
    write_store(path, world, head=True)
    return path


def _test_vectors(store_path):
    with EmbeddingStore.open(store_path) as store:
        rows = store.select(split="test")
        return store.embeddings(rows, normalized=False), store.image_id[rows]


@pytest.mark.parametrize("kind", ["linear", "knn", "tip", "mlp"])
def test_fit_predicts_what_the_sweep_scored_for_the_same_draw(kind, store_path, tmp_path):
    options = FAST.get(kind, {})
    sweep = run_fewshot(store_path, shots=(4,), seeds=2, heads=(kind,), bootstrap=0,
                        keep_scores=True, head_options={kind: options})
    saved = fit_head(store_path, kind, shots=4, seed=1, options=options, out=tmp_path / kind)
    sample = next(s for s in sweep.samples if s["seed"] == 1)
    assert saved.card["train_ids"] == sample["train_ids"]
    assert saved.card["val_sample_ids"] == sample["val_ids"]
    run = next(r for r in sweep.runs if r["seed"] == 1)
    assert saved.card["selected"] == run["selected"]
    vectors, _ = _test_vectors(store_path)
    loaded = load_head(tmp_path / kind)
    expected = sweep.scores[(kind, 4, 1)]
    # The sweep trains mlp seeds stacked (batched products round differently).
    tol = 1e-4 if kind == "mlp" else 1e-5
    np.testing.assert_allclose(saved.scores(vectors), expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(loaded.scores(vectors), saved.scores(vectors), rtol=1e-6, atol=1e-6)
    out = loaded.predict(vectors)
    assert out.probability.shape == expected.shape and np.nanmax(out.probability) <= 1
    card = json.loads((tmp_path / kind / "head.json").read_text())
    assert card["fingerprint"] == {"model": "synthetic"} and card["kind"] == kind


def test_zeroshot_and_adapted_heads_are_training_free(store_path, tmp_path):
    vectors, _ = _test_vectors(store_path)
    sweep = run_fewshot(store_path, shots=(1,), seeds=1, heads=("zeroshot",), bootstrap=0,
                        keep_scores=True)
    saved = fit_head(store_path, "zeroshot", out=tmp_path / "z")
    np.testing.assert_allclose(load_head(tmp_path / "z").scores(vectors),
                               sweep.scores[("zeroshot", 0, None)], atol=1e-5)
    with pytest.raises(ConfigError, match="training-free"):
        fit_head(store_path, "zeroshot", shots=2)
    assert saved.card["train_ids"] == []


@pytest.mark.slow
def test_thresholds_and_calibration_come_from_val_only(world, store_path, tmp_path):
    poisoned = {**world, "y": world["y"].copy()}
    test = world["split"] == "test"
    poisoned["y"][test] = 1 - poisoned["y"][test]  # every test label wrong
    path = tmp_path / "poisoned.h5"
    write_store(path, poisoned, head=True)
    for kind in ("linear", "knn"):
        clean = fit_head(store_path, kind, shots=8, seed=0, threshold="sensitivity=0.9")
        dirty = fit_head(path, kind, shots=8, seed=0, threshold="sensitivity=0.9")
        assert clean.card["calibration"] == dirty.card["calibration"]
        assert clean.card["val_metrics"] == dirty.card["val_metrics"]
        assert {k: c.to_dict() for k, c in clean.calibration.items()} == \
            {k: c.to_dict() for k, c in dirty.calibration.items()}
    # ...and the val labels do matter (the check above can fail)
    val_poisoned = {**world, "y": world["y"].copy()}
    val = world["split"] == "val"
    val_poisoned["y"][val] = 1 - val_poisoned["y"][val]
    write_store(tmp_path / "v.h5", val_poisoned, head=True)
    other = fit_head(tmp_path / "v.h5", "knn", shots=8, seed=0, threshold="sensitivity=0.9")
    assert other.card["calibration"] != clean.card["calibration"] or \
        other.card["val_metrics"] != clean.card["val_metrics"]


def test_calibrated_probabilities_are_better_calibrated_on_test(store_path):
    from cxrembed.calibration import expected_calibration_error, uncalibrated

    saved = fit_head(store_path, "tip", shots=8, seed=0, calibration="platt")
    vectors, _ = _test_vectors(store_path)
    with EmbeddingStore.open(store_path) as store:
        y = store.labels[store.select(split="test")]
    out = saved.predict(vectors)
    before = uncalibrated(out.scores, "logit")
    # tip's scores are CLIP-scale logits (x100): as probabilities they are far off
    ece = [(expected_calibration_error(before[:, c], y[:, c])[0],
            expected_calibration_error(out.probability[:, c], y[:, c])[0]) for c in range(14)]
    assert np.mean([a for a, _ in ece]) > 2 * np.mean([b for _, b in ece])


def test_bad_requests_are_refused_by_name(store_path, tmp_path):
    with pytest.raises(ConfigError, match="give --shots K"):
        fit_head(store_path, "linear")
    with pytest.raises(ConfigError, match="unknown head 'svm'"):
        fit_head(store_path, "svm", all_rows=True)
    with pytest.raises(ConfigError, match="neither a head folder"):
        load_head(tmp_path)


def test_evaluate_reports_the_stored_thresholds_operating_points(store_path, tmp_path):
    from typer.testing import CliRunner

    from cxrembed.cli import app
    from cxrembed.fewshot.operating import evaluate_saved_head

    saved = fit_head(store_path, "tip", shots=8, seed=0, threshold="specificity=0.9",
                     out=tmp_path / "h")
    result = evaluate_saved_head(store_path, tmp_path / "h", bootstrap=100)
    vectors, _ = _test_vectors(store_path)
    with EmbeddingStore.open(store_path) as store:
        y = store.labels[store.select(split="test")].astype(bool)
    name = saved.label_names[0]
    called = saved.scores(vectors)[:, 0] >= saved.calibration[name].threshold
    point = result.operating[name]
    assert point["sensitivity"]["value"] == pytest.approx((called & y[:, 0]).sum() / y[:, 0].sum())
    assert point["npv"]["value"] == pytest.approx((~called & ~y[:, 0]).sum() / (~called).sum())
    assert point["specificity"]["ci_low"] <= point["specificity"]["value"] <= \
        point["specificity"]["ci_high"]
    cal = result.calibration
    assert cal["after"]["mean_ece"] < cal["before"]["mean_ece"]
    assert sum(cal["after"]["reliability"]["pooled"]["count"]) == y.size
    cli = CliRunner().invoke(app, ["evaluate", str(store_path), "--head", str(tmp_path / "h"),
                                   "--bootstrap", "50", "--json"])
    assert cli.exit_code == 0, cli.output
    doc = json.loads(cli.stdout)
    assert set(doc["operating_points"]) == set(saved.label_names)
    assert doc["source"]["thresholds_fitted_on"] == "val" and "reliability" in doc["calibration"]["after"]
    table = CliRunner().invoke(app, ["evaluate", str(store_path), "--head", str(tmp_path / "h"),
                                     "--bootstrap", "0"])
    assert table.exit_code == 0 and "specificity=0.9" in table.output, table.output


def test_cli_fit_writes_a_head_and_refuses_a_missing_draw(store_path, tmp_path):
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from cxrembed.cli import app

    done = CliRunner().invoke(app, ["fit", str(store_path), "--head", "knn", "--shots", "4",
                                    "--seed", "2", "--out", str(tmp_path / "k"),
                                    "--options", '{"k": 3}', "--threshold", "f1"])
    assert done.exit_code == 0, done.output
    card = json.loads((tmp_path / "k" / "head.json").read_text())
    assert card["options"] == {"k": 3} and card["calibration"]["threshold_rule"] == "f1"
    assert card["seed"] == 2 and card["shots"] == 4 and len(card["train_ids"]) > 0
    again = CliRunner().invoke(app, ["fit", str(store_path), "--head", "knn", "--all", "--out",
                                     str(tmp_path / "k")])
    assert isinstance(again.exception, ConfigError) and "--overwrite" in str(again.exception)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = subprocess.run([sys.executable, "-m", "cxrembed", "fit", str(store_path), "--head",
                          "linear", "--out", str(tmp_path / "x")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "give --shots K" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_report_draws_the_saved_heads_operating_points_and_reliability(store_path, tmp_path):
    from cxrembed.fewshot.operating import evaluate_saved_head
    from cxrembed.report import write_report

    fit_head(store_path, "tip", shots=8, seed=0, out=tmp_path / "h")
    result = evaluate_saved_head(store_path, tmp_path / "h", bootstrap=50)
    result.save(tmp_path / "eval.json")
    report = write_report([tmp_path / "eval.json"], tmp_path / "r.html")
    page = report.path.read_text()
    assert "Operating points and calibration" in page and "alt='reliability diagram'" in page
    mean_after = result.calibration["after"]["mean_ece"]
    assert f"{mean_after:.3f}" in page  # the number the JSON holds, as the table shows it
