"""`cxrembed predict` end to end on the synthetic twin with the tiny CLIP: the sweep's
scores, resume after SIGKILL, PNG and DICOM alike, unreadable files listed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from dicom_files import write_dicom

from cxrembed.errors import ConfigError, StoreError
from cxrembed.fewshot import run_fewshot
from cxrembed.fewshot.fit import fit_head
from cxrembed.predict import predict_images
from cxrembed.store import EmbeddingStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tiny_store, tmp_path_factory):
    """The session's tiny-CLIP store of the twin and a linear head fitted on it."""
    root = tmp_path_factory.mktemp("predict")
    dataset, store = tiny_store.dataset, tiny_store.store
    fit_head(store, "linear", all_rows=True, out=root / "head")
    with EmbeddingStore.open(store) as opened:
        rows = opened.select(split="test")
        test_paths = [str(dataset.path[np.flatnonzero(dataset.image_id == i)[0]])
                      for i in opened.image_id[rows]]
    return {"root": root, "store": store, "head": root / "head", "encoder": tiny_store.encoder,
            "test_paths": test_paths, "dataset": dataset}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _probabilities(rows, names):
    return np.array([[float(r[f"{n} probability"] or "nan") for n in names] for r in rows])


def test_predict_equals_the_heads_scores_on_the_stored_vectors(world, tmp_path):
    from cxrembed.heads.saved import load_head
    from cxrembed.labels import LABELS

    out = tmp_path / "p.csv"
    result = predict_images(world["test_paths"], world["head"], out, encoder=world["encoder"])
    assert result.written == len(world["test_paths"]) and result.errors == 0
    rows = _read_csv(out)
    assert [r["path"] for r in rows] == world["test_paths"]
    saved = load_head(world["head"])
    with EmbeddingStore.open(world["store"]) as store:
        vectors = store.embeddings(store.select(split="test"), normalized=False)
    expected = saved.predict(vectors)  # the stored (float16) vectors of the same images
    np.testing.assert_allclose(_probabilities(rows, LABELS), expected.probability, atol=2e-3)
    # and the saved head's scores are the sweep's own for that head (test_saved_heads)
    sweep = run_fewshot(world["store"], shots=(1,), seeds=1, heads=("zeroshot",),
                        bootstrap=0, keep_scores=True)
    zeroshot = fit_head(world["store"], "zeroshot")
    np.testing.assert_allclose(zeroshot.scores(vectors), sweep.scores[("zeroshot", 0, None)],
                               atol=1e-5)


def test_png_and_dicom_of_the_same_picture_predict_the_same(world, tmp_path):
    from cxrembed.data.images import read_image
    from cxrembed.labels import LABELS

    pngs = world["test_paths"][:6]
    dicoms = []
    for p in pngs:
        gray, _ = read_image(p)
        dicoms.append(str(write_dicom(tmp_path / (os.path.basename(p) + ".dcm"), gray)))
    a = predict_images(pngs, world["head"], tmp_path / "png.csv", encoder=world["encoder"])
    b = predict_images(dicoms, world["head"], tmp_path / "dcm.csv", encoder=world["encoder"])
    assert a.errors == b.errors == 0
    np.testing.assert_array_equal(_probabilities(_read_csv(tmp_path / "png.csv"), LABELS),
                                  _probabilities(_read_csv(tmp_path / "dcm.csv"), LABELS))


def test_unreadable_images_are_rows_with_the_reason(world, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([world["test_paths"][0], str(bad), "missing.png",
                                  world["test_paths"][1]]) + "\n")
    result = predict_images([listing], world["head"], tmp_path / "p.json",
                            encoder=world["encoder"], batch_size=2)
    doc = json.loads((tmp_path / "p.json").read_text())
    status = [(r["path"].split("/")[-1], r["status"]) for r in doc["predictions"]]
    assert [s for _, s in status] == ["ok", "error", "error", "ok"] and result.errors == 2
    assert "cannot decode image" in doc["predictions"][1]["error"]
    assert "does not exist" in doc["predictions"][2]["error"]
    assert "not a medical device" in doc["notice"]


def test_neighbours_from_the_store_and_mismatched_encoder_refused(world, tmp_path):
    out = tmp_path / "n.csv"
    predict_images(world["test_paths"][:3], world["head"], out, store=world["store"], k=3,
                   encoder=world["encoder"])
    rows = _read_csv(out)
    with EmbeddingStore.open(world["store"]) as store:
        for r, path in zip(rows, world["test_paths"][:3]):
            ids = r["neighbour ids"].split(";")
            assert len(ids) == 3 and ids[0] == os.path.basename(path)  # itself first
            assert float(r["neighbour similarities"].split(";")[0]) == pytest.approx(1, abs=2e-3)
            assert r["neighbour labels"].split(";")[0] == (
                "|".join(store.label_names[c] for c in
                         np.flatnonzero(store.labels[store.row_of(ids[0])])) or "No Finding")
    from cxrembed.model import load_encoder

    other = load_encoder(model="cxr-tiny", pretrained="none", quick_gelu=True)
    with pytest.raises(StoreError, match="different encoders"):
        predict_images(world["test_paths"][:1], world["head"], tmp_path / "x.csv", encoder=other)
    with pytest.raises(ConfigError, match=".csv or a .json"):
        predict_images(world["test_paths"][:1], world["head"], tmp_path / "x.txt",
                       encoder=world["encoder"])


def test_sigkill_then_rerun_gives_the_uninterrupted_csv(world, tmp_path):
    listing = tmp_path / "all.txt"
    paths = list(world["dataset"].path[:120])
    listing.write_text("\n".join(map(str, paths)) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "cxrembed", "predict", str(listing), "--head",
           str(world["head"]), "--batch-size", "4", "--workers", "1", "--no-progress"]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref.csv")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cut.csv"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") > 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = out.read_text().count("\n")
    assert 20 < lines < 121, "the kill came too late to test anything"
    again = subprocess.run(cmd + ["--out", str(out), "--json"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["already_done"] >= 20 and summary["written"] == 120 - summary["already_done"]
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()
    # Ctrl-C: exit 130, the rows written so far kept, and the way to continue said
    stopped = tmp_path / "ctrl-c.csv"
    proc = subprocess.Popen(cmd + ["--out", str(stopped)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (stopped.exists() and stopped.read_text().count("\n") > 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun the same command to continue" in err
    kept = stopped.read_bytes()
    assert 20 < kept.count(b"\n") < 121 and (tmp_path / "ref.csv").read_bytes().startswith(kept)


def test_cli_usage_error_and_help_notice():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "cxrembed", "predict", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "not a medical device" in " ".join(done.stdout.split())
    done = subprocess.run([sys.executable, "-m", "cxrembed", "predict", "x.png"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--head" in done.stderr


def test_first_batch_sanity_warnings_once_each(world, tmp_path):
    from cxrembed.data.images import read_image
    from cxrembed.predict import PredictWarning

    normal = world["test_paths"][:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictWarning)  # in-distribution: no warning
        predict_images(normal, world["head"], tmp_path / "ok.csv", store=world["store"],
                       encoder=world["encoder"], batch_size=8)
    import cv2

    odd = []
    for i, p in enumerate(normal[:5]):
        gray, _ = read_image(p)
        odd.append(str(tmp_path / f"inv{i}.png"))
        cv2.imwrite(odd[-1], 255 - gray)
    odd.append(str(write_dicom(tmp_path / "lat.dcm", read_image(normal[5])[0], view="LL")))
    rng = np.random.default_rng(0)
    for i in range(2):  # the first batch: 5 inverted, 1 lateral, 2 noise
        odd.append(str(tmp_path / f"noise{i}.png"))
        cv2.imwrite(odd[-1], rng.integers(0, 256, (64, 64)).astype(np.uint8))
    with pytest.warns(PredictWarning) as record:
        result = predict_images(odd + normal, world["head"], tmp_path / "odd.csv",
                                store=world["store"], encoder=world["encoder"], batch_size=8)
    messages = [str(w.message) for w in record]
    assert messages == result.warnings and len(messages) == len(set(messages))
    assert any("look inverted" in m for m in messages)
    assert any("1 of 8 images of the first batch look lateral" in m for m in messages)
    assert any("far from the training data" in m for m in messages)


def test_the_adapted_runs_own_head_fits_and_predicts(world, tmp_path):
    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.encode import encode_dataset
    from cxrembed.heads.saved import load_head
    from cxrembed.model import load_encoder

    config = AdaptConfig.from_dict(dict(model="cxr-tiny", pretrained="none", workers=0,
                                        epochs=1, batch_size=16))
    adapt(world["dataset"], tmp_path / "run", config, progress=False)
    encoder = load_encoder(checkpoint=tmp_path / "run")
    store = tmp_path / "adapted.h5"
    encode_dataset(world["dataset"], store, encoder, batch_size=32, progress=False, workers=0)
    saved = fit_head(store, "adapted", out=tmp_path / "h")
    with EmbeddingStore.open(store) as opened:
        rows = opened.select(split="test")
        np.testing.assert_allclose(saved.scores(opened.embeddings(rows, normalized=False)),
                                   opened.head_logits(rows), atol=5e-3)
    from_run = load_head(tmp_path / "run")  # the run folder itself: uncalibrated, no calls
    assert from_run.kind == "adapted" and from_run.fingerprint == saved.fingerprint
    a = predict_images(world["test_paths"][:4], tmp_path / "run", tmp_path / "a.csv",
                       encoder=encoder)
    b = predict_images(world["test_paths"][:4], tmp_path / "h", tmp_path / "b.csv",
                       encoder=encoder)
    assert a.errors == b.errors == 0
    with pytest.raises(StoreError, match="different encoders"):
        predict_images(world["test_paths"][:1], tmp_path / "h", tmp_path / "c.csv",
                       encoder=world["encoder"])


def test_a_row_cut_off_mid_write_is_redone(world, tmp_path):
    paths = world["test_paths"][:10]
    full = tmp_path / "full.csv"
    predict_images(paths, world["head"], full, encoder=world["encoder"], batch_size=4)
    data = full.read_bytes()
    cut = tmp_path / "cut.csv"
    cut.write_bytes(data[:data.index(b"\n", len(data) // 2) + 25])  # mid-row, mid-batch
    result = predict_images(paths, world["head"], cut, encoder=world["encoder"], batch_size=4)
    assert cut.read_bytes() == data and 0 < result.written < len(paths)
