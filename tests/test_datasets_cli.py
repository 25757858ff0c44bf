"""info / synth / cache / encode on the non-NIH layouts, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrembed.cli import app
from cxrembed.data import load_dataset
from cxrembed.data.chexpert import LABELS as CHEXPERT_LABELS
from cxrembed.data.synth_formats import make_format_twin
from cxrembed.store import EmbeddingStore

runner = CliRunner()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cxrembed", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return make_format_twin(tmp_path_factory.mktemp("cx") / "CheXpert-v1.0-small", "chexpert",
                            images=60, size=40, seed=2, workers=1)


def test_unknown_dataset_is_one_line_listing_the_choices(chexpert):
    result = _run("info", chexpert, "--dataset", "padchst")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unknown --dataset 'padchst'")
    for name in ("auto", "nih", "chexpert", "mimic", "padchest", "csv", "folders"):
        assert name in result.stderr


def test_option_for_another_reader_is_one_line(chexpert):
    result = _run("info", chexpert, "--dataset", "chexpert", "--image-col", "Path")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--image-col does not apply to --dataset chexpert" in result.stderr


@pytest.mark.parametrize("fmt", ["chexpert", "mimic", "padchest", "csv", "folders"])
def test_synth_format_then_info_json(tmp_path, fmt):
    result = _run("synth", tmp_path / fmt, "--format", fmt, "--images", "30", "--size", "40",
                  "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dataset"] == fmt and summary["images_present"] == summary["images"] > 0
    if fmt == "csv":
        return  # info needs the column options (tested in test_readers)
    info = runner.invoke(app, ["info", str(tmp_path / fmt), "--json"])
    assert info.exit_code == 0, info.output
    again = json.loads(info.stdout)
    assert again["label_names"] == summary["label_names"]
    assert sum(s["images"] for s in again["splits"].values()) == summary["images"]


def test_info_shows_the_datasets_own_labels_and_unknowns(chexpert):
    result = runner.invoke(app, ["info", str(chexpert), "--json"])
    summary = json.loads(result.stdout)
    ds = load_dataset(chexpert)
    assert summary["label_names"] == list(CHEXPERT_LABELS)
    k = CHEXPERT_LABELS.index("Lung Opacity")
    train = ds.split == "train"
    assert summary["splits"]["train"]["unknown"]["Lung Opacity"] == int(
        (~ds.label_known[train, k]).sum())
    assert summary["splits"]["train"]["positives"]["Lung Opacity"] == int(
        (ds.labels[train, k] & ds.label_known[train, k]).sum())


@pytest.mark.slow
def test_cache_and_encode_a_chexpert_folder(chexpert, tmp_path):
    ds = load_dataset(chexpert, uncertain="ignore")
    pixels = tmp_path / "px.h5"
    result = _run("cache", chexpert, "--out", pixels, "--workers", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "cx.h5"
    result = runner.invoke(app, ["encode", str(chexpert), "--out", str(out), "--model", "cxr-tiny",
                                 "--pretrained", "none", "--pixel-cache", str(pixels),
                                 "--no-progress", "--json", "--uncertain", "ignore",
                                 "--test-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    with EmbeddingStore.open(out) as store:
        assert store.label_names == list(CHEXPERT_LABELS) and store.dataset == "chexpert"
        np.testing.assert_array_equal(store.image_id, ds.image_id)
        np.testing.assert_array_equal(store.labels, ds.labels)
        np.testing.assert_array_equal(store.label_known, ds.label_known)
        # the stored prompts are the dataset's classes, each with a default pair
        assert set(store.prompts) == set(CHEXPERT_LABELS) | {"No Finding"}
        assert store.prompts["Pleural Effusion"] == (["a chest x-ray showing pleural effusion"],
                                                     ["no pleural effusion"])
        k = CHEXPERT_LABELS.index("Pleural Effusion")
        rows = store.select(label="pleural effusion")
        assert list(rows) == list(np.flatnonzero(ds.labels[:, k] & ds.label_known[:, k]))
        assert set(store.view[store.select(view="LATERAL")]) == {"LATERAL"}
    # zero-shot and few-shot run on the store's own 13 classes, unknown labels left out
    zs = runner.invoke(app, ["zeroshot", str(out), "--bootstrap", "0", "--split", "train",
                             "--json"])
    assert zs.exit_code == 0, zs.output
    assert list(json.loads(zs.stdout)["auc"]) == list(CHEXPERT_LABELS)
    fs = runner.invoke(app, ["fewshot", str(out), "--shots", "1", "--seeds", "1",
                             "--heads", "linear,knn", "--bootstrap", "0", "--no-progress",
                             "--out", str(tmp_path / "fs"), "--json"])
    assert fs.exit_code == 0, fs.output
    saved = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert saved["labels"] == list(CHEXPERT_LABELS)


def test_store_without_a_label_mask_reads_as_all_known(chexpert, tmp_path):
    out = tmp_path / "old.h5"
    ds = load_dataset(chexpert)
    runner.invoke(app, ["encode", str(chexpert), "--out", str(out), "--model", "cxr-tiny",
                        "--pretrained", "none", "--no-progress", "--index", "none"])
    with h5py.File(out, "r+") as f:
        del f["label_known"]
    with EmbeddingStore.open(out) as store:
        assert store.label_known.shape == ds.labels.shape and store.label_known.all()
