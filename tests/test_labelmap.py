"""The label map between vocabularies, and an NIH-adapted head scored on another collection's
store (only the classes they share, unknown labels left out)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cxrembed.data.chexpert import LABELS as CHEXPERT
from cxrembed.errors import ConfigError, DataError
from cxrembed.fewshot import evaluate_adapted_head, run_fewshot
from cxrembed.labelmap import load_label_map
from cxrembed.labels import LABELS as NIH

SHARED = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
          "Consolidation": "Consolidation", "Edema": "Edema", "Effusion": "Pleural Effusion",
          "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax"}


def test_shipped_map_pairs_only_exact_equivalents():
    mapping = load_label_map()
    pairs = mapping.pairs("nih", "chexpert", NIH, CHEXPERT)
    got = {NIH[a]: CHEXPERT[b] for a, b in pairs}
    assert got == SHARED  # no Nodule/Mass -> Lung Lesion, no Infiltration -> Lung Opacity
    assert [b for _, b in pairs] == sorted(b for _, b in pairs)  # in the target's order
    mimic = {CHEXPERT[a]: CHEXPERT[b] for a, b in mapping.pairs("chexpert", "mimic", CHEXPERT,
                                                                CHEXPERT)}
    assert mimic == {n: n for n in CHEXPERT}
    padchest = ["pleural effusion", "pulmonary edema", "hiatal hernia", "normal"]
    got = {NIH[a]: padchest[b] for a, b in mapping.pairs("nih", "padchest", NIH, padchest)}
    assert got == {"Effusion": "pleural effusion", "Edema": "pulmonary edema"}


def test_own_map_and_bad_maps(tmp_path):
    own = tmp_path / "map.csv"
    own.write_text("nih,hospital\nMass,lung mass\nEffusion,effusion\n")
    pairs = load_label_map(own).pairs("nih", "hospital", NIH, ["effusion", "lung mass", "x"])
    assert pairs == [(NIH.index("Effusion"), 0), (NIH.index("Mass"), 1)]
    with pytest.raises(ConfigError, match="no 'chexpert' column.*nih, hospital"):
        load_label_map(own).pairs("nih", "chexpert", NIH, CHEXPERT)
    own.write_text("nih,hospital\nMass,lung mass\nMass,mass\n")
    with pytest.raises(DataError, match="nih names mass in more than one row"):
        load_label_map(own)
    own.write_text("nih\nMass\n")
    with pytest.raises(DataError, match="two or more vocabularies"):
        load_label_map(own)


def external_store(path, n: int = 600, seed: int = 0):
    """A CheXpert-labelled store encoded by an 'NIH-adapted' encoder: 14 NIH head logits,
    13 CheXpert labels with unknowns; shared classes' logits follow their labels."""
    from cxrembed.store import StoreWriter
    from cxrembed.store.schema import ROW_FIELDS

    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CHEXPERT))) < 0.25).astype(np.uint8)
    known = rng.random(y.shape) > 0.2
    logits = rng.normal(size=(n, len(NIH))).astype(np.float32)
    for nih, chex in SHARED.items():
        logits[:, NIH.index(nih)] += 1.5 * y[:, CHEXPERT.index(chex)]
    patient = rng.integers(0, n // 3, n)
    split = np.where(patient % 3 == 0, "test", "train")
    given = {"image_id": np.array([f"train/patient{i:05d}/study1/view1_frontal.jpg"
                                   for i in range(n)]),
             "patient_id": patient, "split": split, "labels": y, "label_known": known,
             "view": np.array(["PA"] * n), "sex": np.array(["F"] * n),
             "age": np.full(n, 50, np.float32)}
    rows = {name: given.get(name, np.array([""] * n) if kind == "S" else np.zeros(n, kind))
            for name, kind in ROW_FIELDS.items()}
    rows["label_known"] = known
    writer = StoreWriter.create(path, rows=rows, embed_dim=8, fingerprint={"model": "x"},
                                has_head=True, has_text=False, batch_size=100, chunk_rows=200,
                                label_names=CHEXPERT, head_label_names=NIH,
                                attrs={"model_name": "x", "dataset": "chexpert"})
    with writer:
        x = rng.normal(size=(n, 8)).astype(np.float32)
        for start in range(0, n, 100):
            writer.append(x[start:start + 100], logits[start:start + 100])
        writer.finish()
    return y, known, logits, split


def test_nih_head_on_a_chexpert_store_scores_the_shared_classes(tmp_path):
    path = tmp_path / "external.h5"
    y, known, logits, split = external_store(path)
    result = evaluate_adapted_head(path, bootstrap=30)
    shared = [c for c in CHEXPERT if c in SHARED.values()]
    assert list(result.label_names) == shared
    test = split == "test"
    for k, name in enumerate(shared):
        c = CHEXPERT.index(name)
        h = NIH.index(next(n for n, m in SHARED.items() if m == name))
        rows = test & known[:, c]
        assert result.auc[k] == pytest.approx(roc_auc_score(y[rows, c], logits[rows, h]),
                                              abs=1e-9)
    assert result.mean_auc > 0.75
    record = result.to_dict()["source"]["label_map"]
    assert record["classes"]["Pleural Effusion"] == "Effusion" and record["head"] == "nih"
    # the few-shot sweep refuses to compare the head's 14 columns with 13 labels
    with pytest.raises(ConfigError, match="evaluate STORE --head adapted"):
        run_fewshot(path, heads=("adapted", "linear"), shots=(1,), seeds=1, bootstrap=0)


def test_cli_evaluate_external_with_an_own_label_map(tmp_path):
    from cxrembed.cli import app

    path = tmp_path / "external.h5"
    external_store(path)
    own = tmp_path / "map.csv"
    own.write_text("nih,chexpert\nMass,Lung Lesion\n")
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(path), "--head", "adapted", "--bootstrap", "0",
                                 "--label-map", str(own), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # identical names pair by themselves; the own map adds Lung Lesion and (unlike the
    # shipped one) has no Effusion row
    assert list(out["auc"]) == ["Cardiomegaly", "Lung Lesion", "Edema", "Consolidation",
                                "Pneumonia", "Atelectasis", "Pneumothorax"]
    assert out["source"]["label_map"]["classes"]["Lung Lesion"] == "Mass"


def test_no_shared_class_says_to_pass_a_map():
    from cxrembed.fewshot import EvalData
    from cxrembed.fewshot.protocols import shared_head_classes

    n = 10
    data = EvalData(labels=np.zeros((n, 2), np.uint8), patient_id=np.arange(n),
                    split=np.array(["test"] * n), embeddings=np.ones((n, 4)),
                    label_names=("foo", "bar"), head_label_names=NIH, vocabulary="hospital",
                    head_logits=np.zeros((n, 14)))
    with pytest.raises(ConfigError, match="no 'hospital' column"):
        shared_head_classes(data)
    data.vocabulary = "padchest"
    with pytest.raises(DataError, match="share none.*--label-map FILE"):
        shared_head_classes(data)
