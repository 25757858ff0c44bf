"""The few-shot protocol end to end: sampling, leak-freedom, reproducibility, outputs,
zero-shot from a real store without model weights, the comparison, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrembed.errors import ConfigError, StoreError
from cxrembed.fewshot import (EvalData, evaluate_adapted_head, evaluate_zeroshot, load_result,
                              run_fewshot, sample_shots)
from cxrembed.labels import LABELS, default_prompts
from cxrembed.metrics import per_class_auc

DIM = 32
FAST = {"mlp": {"epochs": 6}}


def planted(n: int = 3000, seed: int = 0, text_noise: float = 1.0):
    """Vectors with one direction per class, patient-level splits, weak text prompts."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(14, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    y = (rng.random((n, 14)) < 0.12).astype(np.uint8)
    patient = rng.integers(0, n // 4, n)
    u = rng.random(n // 4)
    split = np.where(u < 0.3, "test", np.where(u < 0.45, "val", "train"))[patient]
    x = rng.normal(size=(n, DIM)) + 2.0 * y @ directions + 0.5
    pos = {LABELS[c]: directions[c] + text_noise * rng.normal(size=DIM) for c in range(14)}
    neg = {LABELS[c]: -directions[c] + text_noise * rng.normal(size=DIM) for c in range(14)}
    text = {name: (pos[name][None], neg[name][None]) for name in LABELS}
    return {"x": (3 * x).astype(np.float32), "y": y, "patient": patient, "split": split,
            "text": text, "pos": pos, "neg": neg}


@pytest.fixture(scope="module")
def world():
    return planted()


def eval_data(w, labels=None, **extra) -> EvalData:
    return EvalData(labels=w["y"] if labels is None else labels, patient_id=w["patient"],
                    split=w["split"], embeddings=w["x"], text=w["text"], **extra)


def write_store(path, w, head: bool = False):
    """A real EmbeddingStore of the planted world (default prompts stored with vectors)."""
    from cxrembed.store import StoreWriter

    n = len(w["y"])
    prompts = default_prompts()
    vectors = {}
    for name, (pos, neg) in prompts.items():
        vectors[pos[0]], vectors[neg[0]] = w["pos"][name], w["neg"][name]
    distinct = list(dict.fromkeys(p for pair in prompts.values() for side in pair for p in side))
    from cxrembed.store.schema import ROW_FIELDS

    known = {"image_id": np.array([f"{i:08d}_000.png" for i in range(n)]),
             "patient_id": w["patient"], "split": w["split"], "labels": w["y"],
             "view": np.array(["PA"] * n), "sex": np.array(["F"] * n),
             "age": np.full(n, 50, np.float32)}
    rows = {name: known.get(name, np.array([""] * n) if kind == "S" else np.zeros(n, kind))
            for name, kind in ROW_FIELDS.items()}  # other fields: empty / zero
    logits = (w["y"] * 2.0 + np.random.default_rng(1).normal(size=w["y"].shape)).astype(np.float32)
    writer = StoreWriter.create(path, rows=rows, embed_dim=DIM, fingerprint={"model": "synthetic"},
                                has_head=head, has_text=True, batch_size=100, chunk_rows=500,
                                prompts=prompts,
                                text_embeddings=np.stack([vectors[p] for p in distinct]),
                                attrs={"model_name": "synthetic"})
    with writer:
        for start in range(0, n, 100):
            writer.append(w["x"][start:start + 100], logits[start:start + 100] if head else None)
        writer.finish()
    return logits


def sweep(data, **options):
    defaults = dict(shots=(1, 4), seeds=2, bootstrap=50, head_options=FAST,
                    heads=("mlp", "linear", "knn", "tip", "zeroshot"))
    return run_fewshot(data, **{**defaults, **options})


def test_sampling_is_from_one_split_nested_and_takes_all_of_a_small_class(world):
    y, split = world["y"].copy(), world["split"]
    train = np.flatnonzero(split == "train")
    y[train, 5] = 0
    y[train[:3], 5] = 1  # Emphysema: 3 training positives only
    samples = {k: sample_shots(y, split, k, seed=4) for k in (1, 2, 4, 8)}
    for k, rows in samples.items():
        assert (split[rows] == "train").all()
        positives = y[rows].sum(axis=0)
        assert (positives >= min(k, 3)).all() and positives[5] == min(k, 3)
        assert (y[rows].sum(axis=1) == 0).sum() >= k  # K "No Finding" negatives
    assert set(samples[1]) <= set(samples[2]) <= set(samples[4]) <= set(samples[8])
    val = sample_shots(y, split, 4, seed=4, split_name="val")
    assert (split[val] == "val").all()
    none = sample_shots(y, split, 4, seed=4, no_finding=False)
    assert len(none) < len(samples[4])


def test_the_sweep_draws_its_samples_with_sample_shots(world):
    result = sweep(eval_data(world), shots=(1, 2, 4), seeds=2, bootstrap=0, heads=("knn",),
                   seed=3)
    for rec in result.samples:
        train = sample_shots(world["y"], world["split"], rec["shots"], rec["seed"], base_seed=3)
        val = sample_shots(world["y"], world["split"], rec["shots"], rec["seed"], base_seed=3,
                           split_name="val")
        assert rec["train_rows"] == train.tolist() and rec["val_rows"] == val.tolist()
    nested = sample_shots(world["y"], world["split"], (1, 2, 4), 1, base_seed=3)
    assert [a.tolist() for a in nested] == [
        sample_shots(world["y"], world["split"], k, 1, base_seed=3).tolist() for k in (1, 2, 4)]


def test_a_class_short_of_shots_is_reported_and_impossible_shots_refused(world):
    y = world["y"].copy()
    train = np.flatnonzero(world["split"] == "train")
    y[train, 13] = 0
    y[train[:3], 13] = 1  # Hernia: 3 training images
    result = sweep(eval_data(world, labels=y), shots=(2, 4, 8), seeds=1, bootstrap=0,
                   heads=("linear",))
    short = {(r["split"], r["class"], r["shots"]): r["available"]
             for r in result.source["shortfall"]}
    assert short[("train", "Hernia", 4)] == 3 and short[("train", "Hernia", 8)] == 3
    assert ("train", "Hernia", 2) not in short
    assert all(k[1] == "Hernia" or k[0] == "val" for k in short)
    from cxrembed.fewshot import class_supply

    most = max(class_supply(y, world["split"]).values())
    with pytest.raises(ConfigError, match=f"--shots {most + 1}: the train split has at most "
                                          f"{most} images of one class"):
        sweep(eval_data(world, labels=y), shots=(1, most + 1), seeds=1, heads=("knn",))


def test_cli_says_when_shots_are_short_and_refuses_too_many(world, tmp_path):
    write_store(tmp_path / "s.h5", world)
    base = [sys.executable, "-m", "cxrembed", "fewshot", str(tmp_path / "s.h5"), "--seeds", "1",
            "--heads", "knn", "--bootstrap", "0", "--no-progress", "--out", str(tmp_path / "f")]
    done = subprocess.run(base + ["--shots", "1000"], capture_output=True, text=True)
    assert done.returncode == 1 and "--shots 1000" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "f").exists()
    most = max(world["y"][world["split"] == "train"].sum(axis=0))
    done = subprocess.run(base + ["--shots", str(most)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert "fewer shots than asked" in printed and f"fewer than {most} shots" in printed
    assert load_result(tmp_path / "f")["source"]["shortfall"]


@pytest.mark.slow
def test_cli_refuses_cuda_without_a_gpu_before_any_work(world, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present (tests/test_gpu.py runs the sweep on it)")
    write_store(tmp_path / "s.h5", world)
    done = subprocess.run([sys.executable, "-m", "cxrembed", "fewshot", str(tmp_path / "s.h5"),
                           "--device", "cuda", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "--device cuda:" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "f").exists()


def test_device_auto_runs_where_torch_can_and_cuda_is_refused_before_any_work(world):
    """``--device auto`` takes a GPU only when torch sees one (here: the CPU, the same
    numbers as ``cpu``, the device used kept in the result); CUDA asked for without one is
    refused by name before anything is fitted."""
    torch = pytest.importorskip("torch")
    options = dict(shots=(2,), seeds=2, bootstrap=20, heads=("mlp", "zeroshot"))
    auto = sweep(eval_data(world), device="auto", **options)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.source["device"].startswith(expected)
    if expected == "cpu":
        cpu = sweep(eval_data(world), device="cpu", **options)
        assert auto.summary == cpu.summary
        with pytest.raises(ConfigError, match="--device cuda:1"):
            sweep(eval_data(world), device="cuda:1", **options)
    with pytest.raises(ConfigError, match="unknown device 'tpu'.*auto, cpu, cuda"):
        sweep(eval_data(world), device="tpu", **options)


def test_heads_beat_chance_and_improve_with_shots(world):
    result = sweep(eval_data(world), shots=(1, 16), seeds=3, bootstrap=0)
    mean = {(r["head"], r["shots"]): r["mean_auc"]["mean"] for r in result.summary}
    assert 0.58 < mean["zeroshot", 0] < 0.95
    for head in ("mlp", "linear", "knn", "tip"):
        assert mean[head, 16] > 0.65, head
        assert mean[head, 16] > mean[head, 1] + 0.02, head
    assert len(result.runs) == 1 + 4 * 2 * 3


@pytest.mark.slow
def test_no_test_row_enters_training_or_selection(world):
    """Poisoned test labels change the test AUCs and nothing else: same samples, same
    hyper-parameters and epochs chosen, identical test scores."""
    clean = sweep(eval_data(world), keep_scores=True)
    labels = world["y"].copy()
    test = world["split"] == "test"
    rng = np.random.default_rng(9)
    labels[test] = rng.permutation(labels[test])
    labels[test, :7] = 1 - labels[test, :7]
    poisoned = sweep(eval_data(world, labels=labels), keep_scores=True)
    assert clean.samples == poisoned.samples
    for sample in clean.samples:
        assert not test[sample["train_rows"]].any() and not test[sample["val_rows"]].any()
    for a, b in zip(clean.runs, poisoned.runs):
        assert (a["head"], a["shots"], a["seed"]) == (b["head"], b["shots"], b["seed"])
        assert a["selected"] == b["selected"]
    for key in clean.scores:
        np.testing.assert_array_equal(clean.scores[key], poisoned.scores[key])
    assert [r["mean_auc"] for r in clean.runs] != [r["mean_auc"] for r in poisoned.runs]


def _without_timing(result):
    out = result.to_dict()
    out.pop("timing")
    for run in out["runs"]:
        run.pop("seconds")
    return out


@pytest.mark.slow
def test_same_seed_reproduces_exactly_and_another_seed_differs(world):
    a = sweep(eval_data(world))
    b = sweep(eval_data(world))
    assert _without_timing(a) == _without_timing(b)
    c = sweep(eval_data(world), seed=1)
    assert c.samples != a.samples


def test_outputs_json_csv_plot_and_intervals(world, tmp_path):
    result = sweep(eval_data(world), out=tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"fewshot.json", "fewshot_auc.csv", "fewshot_summary.csv", "config.json",
                     "fewshot_mean_auc.png"}
    assert (tmp_path / "run" / "fewshot_mean_auc.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "run" / "fewshot_auc.csv").read_text().splitlines()
    assert lines[0] == "head,shots,seed,class,auc" and len(lines) == 1 + len(result.runs) * 15
    summary = (tmp_path / "run" / "fewshot_summary.csv").read_text().splitlines()
    assert summary[0] == "head,shots,class,n_seeds,mean,std,ci_low,ci_high"
    assert len(summary) == 1 + len(result.summary) * 15
    saved = load_result(tmp_path / "run")
    assert saved["config"]["shots"] == [1, 4] and saved["summary"] == result.summary
    for row in result.summary:
        m = row["mean_auc"]
        assert m["ci_low"] <= m["mean"] <= m["ci_high"]
        assert row["n_seeds"] == (1 if row["shots"] == 0 else 2)
        assert set(row["per_class"]) == set(LABELS)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ci"] == "pooled"


def test_full_interval_is_exact_and_pooled_is_not_narrower(world):
    data = eval_data(world)
    pooled = sweep(data, heads=("linear",), seeds=4, bootstrap=400, ci="pooled")
    full = sweep(data, heads=("linear",), seeds=4, bootstrap=400, ci="full")
    for p, f in zip(pooled.summary, full.summary):
        assert p["mean_auc"]["mean"] == f["mean_auc"]["mean"]
        wp = p["mean_auc"]["ci_high"] - p["mean_auc"]["ci_low"]
        wf = f["mean_auc"]["ci_high"] - f["mean_auc"]["ci_low"]
        assert f["mean_auc"]["ci_low"] <= f["mean_auc"]["mean"] <= f["mean_auc"]["ci_high"]
        assert wp >= 0.8 * wf  # conservative up to resampling noise
    none = sweep(data, heads=("linear",), bootstrap=0)
    assert none.summary[0]["mean_auc"]["ci_low"] is None


def test_bad_configuration_is_refused_by_name(world):
    with pytest.raises(ConfigError, match="unknown head"):
        sweep(eval_data(world), heads=("svm",))
    with pytest.raises(ConfigError, match="unknown few-shot option"):
        sweep(eval_data(world), shot=(1,))
    with pytest.raises(StoreError, match="no adapted head"):
        sweep(eval_data(world), heads=("mlp",), init="adapted")


def test_mlp_starts_from_the_adapted_head_when_asked(world):
    torch = pytest.importorskip("torch")
    from cxrembed.model.head import DiagnosisHead as PaperHead

    torch.manual_seed(0)
    state = PaperHead(in_dim=DIM).state_dict()
    result = sweep(eval_data(world, head_state=lambda: state), heads=("mlp",), init="adapted",
                   shots=(2,), seeds=1)
    assert result.runs[0]["selected"]["init"] == "adapted"


@pytest.fixture()
def no_model_weights(monkeypatch):
    """Any attempt to load an encoder (and so a weights file) fails loudly."""
    import cxrembed.model
    import cxrembed.model.encoder
    from cxrembed.store import EmbeddingStore

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(cxrembed.model, "load_encoder", refuse)
    monkeypatch.setattr(cxrembed.model.encoder, "load_encoder", refuse)
    monkeypatch.setattr(EmbeddingStore, "encoder", refuse)


def test_zeroshot_on_stored_prompts_touches_no_model_weights(world, tmp_path, no_model_weights):
    write_store(tmp_path / "s.h5", world)
    result = evaluate_zeroshot(tmp_path / "s.h5", bootstrap=100)
    from cxrembed.heads import make_head
    from cxrembed.store import EmbeddingStore

    test = np.flatnonzero(world["split"] == "test")
    with EmbeddingStore.open(tmp_path / "s.h5") as store:  # float16 vectors, as stored
        x_test = store.embeddings(test)
    expected = per_class_auc(world["y"][test], make_head("zeroshot", text=world["text"])
                             .predict(x_test))
    np.testing.assert_allclose(result.auc, expected, atol=1e-9)
    assert result.ci is not None and result.source["prompts"]["encoded"] == []
    # A prompt the store does not hold needs the text tower: the guard is really hit.
    with pytest.raises(AssertionError, match="model weights were loaded"):
        evaluate_zeroshot(tmp_path / "s.h5", prompts={"Edema": ["pulmonary edema", "no edema"]})


def test_adapted_head_is_reported_under_its_name(world, tmp_path):
    logits = write_store(tmp_path / "h.h5", world, head=True)
    result = evaluate_adapted_head(tmp_path / "h.h5", bootstrap=0)
    test = world["split"] == "test"
    np.testing.assert_allclose(result.auc, per_class_auc(world["y"][test], logits[test]))
    assert result.to_dict()["protocol"] == "adapted-head"
    write_store(tmp_path / "f.h5", world)
    with pytest.raises(StoreError, match="adapted"):
        evaluate_adapted_head(tmp_path / "f.h5")


def test_cli_on_a_store_and_compare_with_the_paper(world, tmp_path):
    from cxrembed.cli.common import app
    from cxrembed.compare import PUBLISHED_FEWSHOT, PUBLISHED_MEAN, compare_results

    write_store(tmp_path / "s.h5", world, head=True)
    runner = CliRunner()
    out = runner.invoke(app, ["fewshot", str(tmp_path / "s.h5"), "--shots", "1,2", "--seeds",
                              "2", "--heads", "linear,knn,zeroshot,adapted", "--bootstrap", "50",
                              "--out", str(tmp_path / "fs"), "--no-progress", "--json"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "fs" / "fewshot.json").is_file()
    printed = json.loads(out.stdout)
    assert {(r["head"], r["shots"]) for r in printed["summary"]} == {
        ("zeroshot", 0), ("adapted", 0), ("linear", 1), ("linear", 2), ("knn", 1), ("knn", 2)}
    saved = load_result(tmp_path / "fs")
    assert saved["samples"][0]["train_ids"][0].endswith(".png")
    zs = runner.invoke(app, ["zeroshot", str(tmp_path / "s.h5"), "--bootstrap", "50", "--json",
                             "--out", str(tmp_path / "zs.json")])
    assert zs.exit_code == 0, zs.output
    assert json.loads(zs.stdout)["protocol"] == "zeroshot"
    ev = runner.invoke(app, ["evaluate", str(tmp_path / "s.h5"), "--head", "adapted",
                             "--bootstrap", "0"])
    assert ev.exit_code == 0 and "adapted head" in ev.output
    cmp = runner.invoke(app, ["compare", str(tmp_path / "fs"), str(tmp_path / "zs.json"),
                              "--out", str(tmp_path / "cmp")])
    assert cmp.exit_code == 0, cmp.output
    assert "ChXz*" in cmp.output and "E1 = synthetic" in cmp.output

    comparison = compare_results([tmp_path / "fs", tmp_path / "zs.json"])
    table = comparison.table1()
    assert [row["class"] for row in table] == list(LABELS) + ["Mean"]
    assert table[-1]["CheXzero (published)"] == PUBLISHED_MEAN["CheXzero"]
    assert table[0]["CheXzero (published)"] == 0.758  # Atelectasis, shipped Table 1
    few = {row["shots"]: row for row in comparison.fewshot_table()}
    assert few[16]["Dalsania 2025 (published)"] == PUBLISHED_FEWSHOT[16]
    linear_1 = next(r for r in saved["summary"] if r["head"] == "linear" and r["shots"] == 1)
    assert few[1]["linear [E1]"] == linear_1["mean_auc"]
    fields = [(c.method, c.shots, c.encoder, c.tag) for c in comparison.ours]
    assert fields == [("zeroshot", None, "E1", "fs"), ("adapted-head", None, "E1", None),
                      ("linear", 2, "E1", None), ("knn", 2, "E1", None),
                      ("zeroshot", None, "E1", "zs")]  # one store: one encoder, one set
    assert comparison.ours[4].mean == pytest.approx(comparison.ours[0].mean)  # same protocol
    assert (tmp_path / "cmp" / "comparison_table1.csv").is_file()


def test_cli_error_is_one_red_line_and_exit_code_1(world, tmp_path):
    write_store(tmp_path / "f.h5", world)
    done = subprocess.run([sys.executable, "-m", "cxrembed", "evaluate", str(tmp_path / "f.h5")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "error" in done.stderr and "adapted" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------
# Any label set, with unknown labels


NAMES5 = ("Lung Opacity", "Pleural Effusion", "Fracture", "Edema", "Support Devices")


@pytest.fixture(scope="module")
def world5():
    """The planted world cut to 5 classes with CheXpert's names, 15% of labels unknown."""
    w = planted(seed=4)
    rng = np.random.default_rng(5)
    known = rng.random((len(w["y"]), 5)) > 0.15
    text = {new: w["text"][old] for new, old in zip(NAMES5, LABELS)}
    return {**w, "y": w["y"][:, :5].copy(), "known": known, "text": text}


def eval5(w, labels=None) -> EvalData:
    return EvalData(labels=w["y"] if labels is None else labels, patient_id=w["patient"],
                    split=w["split"], embeddings=w["x"], text=w["text"], label_names=NAMES5,
                    known=w["known"])


def test_any_label_set_leak_free_with_unknown_labels(world5):
    """The leak test on a 5-class set with a mask: poisoned test labels (known or not)
    change test AUCs only; unknown test cells change nothing at all; shots are known
    positives; every AUC equals sklearn's on the known rows."""
    clean = sweep(eval5(world5), keep_scores=True, shots=(2, 8))
    assert clean.label_names == NAMES5 and list(clean.runs[0]["auc"]) == list(NAMES5)
    test = world5["split"] == "test"
    under_mask = world5["y"].copy()
    under_mask[test & ~world5["known"].all(axis=1)] ^= (~world5["known"])[
        test & ~world5["known"].all(axis=1)].astype(np.uint8)
    masked = sweep(eval5(world5, labels=under_mask), keep_scores=True, shots=(2, 8))
    assert [r["auc"] for r in masked.runs] == [r["auc"] for r in clean.runs]
    poisoned_labels = world5["y"].copy()
    poisoned_labels[test] = 1 - poisoned_labels[test]
    poisoned = sweep(eval5(world5, labels=poisoned_labels), keep_scores=True, shots=(2, 8))
    assert clean.samples == poisoned.samples
    for a, b in zip(clean.runs, poisoned.runs):
        assert a["selected"] == b["selected"]
    for key in clean.scores:
        np.testing.assert_array_equal(clean.scores[key], poisoned.scores[key])
    for sample in clean.samples:
        rows = np.array(sample["train_rows"])
        assert not test[rows].any()
        positive = (world5["y"][rows] == 1) & world5["known"][rows]
        nothing = world5["known"][rows].all(axis=1) & (world5["y"][rows].sum(axis=1) == 0)
        assert (positive.any(axis=1) | nothing).all()  # no shot is there for an unknown
    from sklearn.metrics import roc_auc_score

    y, k = world5["y"][test], world5["known"][test]
    for run in clean.runs[:3]:
        scores = clean.scores[(run["head"], run["shots"], run["seed"])]
        for c, name in enumerate(NAMES5):
            assert run["auc"][name] == pytest.approx(
                roc_auc_score(y[k[:, c], c], scores[k[:, c], c]), abs=1e-9)
    mean = {(r["head"], r["shots"]): r["mean_auc"]["mean"] for r in clean.summary}
    assert mean["linear", 8] > 0.65 and mean["zeroshot", 0] > 0.55


def test_protocols_on_a_store_of_another_label_set(world5, tmp_path):
    result = evaluate_zeroshot(eval5(world5), bootstrap=20)
    assert result.label_names == NAMES5 and list(result.to_dict()["auc"]) == list(NAMES5)
    test = world5["split"] == "test"
    assert result.ci.names == NAMES5
    np.testing.assert_allclose(result.auc, per_class_auc(
        world5["y"][test], _zs(world5)[test], known=world5["known"][test]), atol=1e-12)


def _zs(w):
    from cxrembed.heads import make_head

    x = w["x"] / np.linalg.norm(w["x"], axis=1, keepdims=True)
    return make_head("zeroshot", text=w["text"], label_names=NAMES5).predict(x)


def test_class_supply_counts_what_shot_orders_can_draw_with_unknown_labels():
    """The supply the sweep checks shot counts against is exactly the length of each
    class's draw order, also when some labels are unknown (masked)."""
    from cxrembed.fewshot.sampling import class_supply, seeded_rng, shot_orders

    rng = np.random.default_rng(3)
    labels = (rng.random((300, 4)) < 0.2).astype(np.uint8)
    known = rng.random((300, 4)) > 0.3
    split = np.where(rng.random(300) < 0.7, "train", "val")
    names = ["A", "B", "C", "D"]
    supply = class_supply(labels, split, "train", True, names, known)
    orders = shot_orders(labels, np.flatnonzero(split == "train"), seeded_rng(0), True, known)
    assert list(supply.values()) == [len(o) for o in orders]
    assert supply != class_supply(labels, split, "train", True, names)  # the mask matters


def test_prediction_threads_change_no_score_and_are_restored(world, monkeypatch):
    """The sweep's test predictions may use more BLAS/torch threads than its fits
    (PREDICT_THREADS, measured by bench_fewshot --predict-threads): the scores are the
    same up to float rounding (a product split over threads sums in another order), the
    AUCs too, the timing says where the predictions' time went, and the caller's thread
    settings are left as they were."""
    torch = pytest.importorskip("torch")
    import cxrembed.fewshot.sweep as sweep_module

    options = dict(shots=(2,), seeds=2, heads=("mlp", "knn"), keep_scores=True)
    before = torch.get_num_threads()
    monkeypatch.setattr(sweep_module, "PREDICT_THREADS", 1)
    one = sweep(eval_data(world), **options)
    monkeypatch.setattr(sweep_module, "PREDICT_THREADS", 2)
    two = sweep(eval_data(world), **options)
    assert torch.get_num_threads() == before
    assert one.scores.keys() == two.scores.keys() and len(one.scores) == 4
    for key, scores in one.scores.items():
        np.testing.assert_allclose(scores, two.scores[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(one.runs, two.runs):
        assert (a["head"], a["shots"], a["seed"]) == (b["head"], b["shots"], b["seed"])
        assert a["mean_auc"] == pytest.approx(b["mean_auc"], abs=1e-6)
    assert set(two.timing["predict_s"]) == {"mlp", "knn"}
    assert all(0 < two.timing["predict_s"][h] <= two.timing["fit_predict_s"][h]
               for h in ("mlp", "knn"))
