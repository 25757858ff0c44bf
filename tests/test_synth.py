"""The synthetic twin: the NIH layout and files, patient-disjoint lists, learnable findings."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cxrembed.data import load_nih
from cxrembed.data.images import decode
from cxrembed.data.synth import CSV_HEADER, make_twin, sample_labels
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS, NIH_PREVALENCE


def test_layout_and_official_files(twin):
    assert (twin / "Data_Entry_2017.csv").read_text().splitlines()[0] == CSV_HEADER
    pngs = sorted((twin / "images_001" / "images").glob("*.png"))
    assert len(pngs) == 240 and pngs[0].name == "00000001_000.png"
    for name in ("train_val_list.txt", "test_list.txt"):
        text = (twin / name).read_text()
        assert not text.endswith("\n")  # like the release
    ds = load_nih(twin)
    counts = np.bincount(ds.patient_id)
    assert counts.max() > 1 and (counts[counts > 0].mean()) > 2  # several images per patient
    tv = set(ds.patient_id[ds.split != "test"])
    assert tv.isdisjoint(ds.patient_id[ds.split == "test"])
    assert 0.15 < (ds.split == "test").mean() < 0.35


def test_same_seed_same_bytes(tmp_path):
    def digest(folder):
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    a = make_twin(tmp_path / "a", images=40, size=48, seed=5, workers=1)
    b = make_twin(tmp_path / "b", images=40, size=48, seed=5, workers=1)
    c = make_twin(tmp_path / "c", images=40, size=48, seed=6, workers=1)
    assert digest(a) == digest(b) != digest(c)


def test_labels_follow_nih_prevalence_and_cooccur():
    labels = sample_labels(40_000, np.random.default_rng(0))
    prevalence = labels.mean(axis=0)
    assert np.abs(prevalence - np.array(NIH_PREVALENCE)).max() < 0.04
    assert 0.5 < (labels.sum(axis=1) == 0).mean() < 0.58
    eff, ate = LABELS.index("Effusion"), LABELS.index("Atelectasis")
    p_ate_given_eff = labels[labels[:, eff] == 1, ate].mean()
    assert p_ate_given_eff > 2 * prevalence[ate]


def test_every_class_has_positives_in_train_val_and_test(twin):
    ds = load_nih(twin)
    for part in (ds.split == "test", ds.split != "test"):
        assert (ds.labels[part].sum(axis=0) >= 3).all()


@pytest.mark.slow
def test_linear_probe_on_pixels_beats_chance(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    ds = load_nih(make_twin(tmp_path / "nih", images=1200, size=96, seed=2))
    x = np.stack([decode(p, size=32) for p in ds.path]).reshape(len(ds), -1) / 255.0
    train, test = ds.split != "test", ds.split == "test"
    aucs = []
    for k in range(len(LABELS)):
        probe = LogisticRegression(C=0.1, max_iter=300).fit(x[train], ds.labels[train, k])
        aucs.append(roc_auc_score(ds.labels[test, k], probe.decision_function(x[test])))
    assert np.mean(aucs) > 0.75, np.round(aucs, 2)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="--images"):
        make_twin(tmp_path, images=5)
    with pytest.raises(ConfigError, match="--size"):
        make_twin(tmp_path, size=8)
