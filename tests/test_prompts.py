"""One prompts format: both shapes, defaults for any label set, merging, one error type,
and the same files accepted alike by every command that takes ``--prompts``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrembed.errors import ConfigError, PromptsError
from cxrembed.labels import LABELS, NO_FINDING
from cxrembed.prompts import (class_prompts, default_pair, default_prompts, load_prompts,
                              merge_prompts, parse_prompts, read_prompts)

PAIRS = {"Edema": ["fluid in the lungs", "clear lungs"],
         "pleural_thickening": [["thick pleura", "pleural thickening"], "thin pleura"]}
TEMPLATES = {"templates": [["an x-ray with {disease}", "{disease}"], ["an x-ray without {disease}"]],
             "Hernia": {"positive": ["hiatal hernia"], "negative": ["no hernia"]}}


def test_pairs_shape_with_any_spelling():
    got = parse_prompts(PAIRS)
    assert got == {"Edema": (["fluid in the lungs"], ["clear lungs"]),
                   "Pleural Thickening": (["thick pleura", "pleural thickening"],
                                          ["thin pleura"])}


def test_templates_ensemble_for_every_label_and_per_label_entries_win():
    got = parse_prompts(TEMPLATES)
    assert set(got) == set(LABELS)
    assert got["Edema"] == (["an x-ray with edema", "edema"], ["an x-ray without edema"])
    assert got["Pleural Thickening"][0][0] == "an x-ray with pleural thickening"
    assert got["Hernia"] == (["hiatal hernia"], ["no hernia"])


def test_merge_layers_in_order_over_the_defaults():
    store = {"Edema": (["stored edema"], ["stored no edema"]),
             "Mass": (["stored mass"], ["stored no mass"]), NO_FINDING: (["no finding"], [])}
    merged = merge_prompts(store, parse_prompts(PAIRS))
    assert list(merged) == list(LABELS)  # no No Finding column for zero-shot
    assert merged["Edema"] == (["fluid in the lungs"], ["clear lungs"])  # the file wins
    assert merged["Mass"] == (["stored mass"], ["stored no mass"])  # then the store
    assert merged["Nodule"] == default_prompts()["Nodule"]  # then the defaults
    stored = class_prompts(PAIRS)
    assert stored[NO_FINDING] == (["no finding"], []) and len(stored) == len(LABELS) + 1


def test_other_label_sets_get_a_default_pair_from_the_name():
    labels = ["Lung Opacity", "Support_Devices", "Enlarged Cardiomediastinum"]
    assert default_prompts(labels)["Support_Devices"] == default_pair("Support Devices") == (
        ["a chest x-ray showing support devices"], ["no support devices"])
    got = parse_prompts({"lung opacity": ["opacity", "clear"],
                         "templates": [["{disease} seen"], ["{disease} absent"]]}, labels)
    assert got["Lung Opacity"] == (["opacity"], ["clear"])
    assert got["Enlarged Cardiomediastinum"] == (["enlarged cardiomediastinum seen"],
                                                 ["enlarged cardiomediastinum absent"])
    with pytest.raises(PromptsError, match="'Edema' is not a label.*Lung Opacity"):
        parse_prompts({"Edema": ["a", "b"]}, labels)


@pytest.mark.parametrize("obj,match", [
    ({"Edemaa": ["a", "b"]}, "'Edemaa' is not a label"),
    ({"Edema": ["only one"]}, "positive, negative"),
    ({"Edema": ["pos", []]}, "negative"),
    ({"Edema": [[], "neg"]}, "positive"),
    ({"Edema": {"positive": ["a"], "negativ": ["b"]}}, "keys"),
    ({"Edema": ["", "neg"]}, "non-empty"),
    ({"templates": [["{disease} {view}"], ["no {disease}"]]}, "only placeholder"),
    ({"templates": [["{disease}"], []]}, "negative"),
    ([["a", "b"]], "JSON object"),
    ({}, "JSON object"),
])
def test_malformed_prompts_raise_one_error_type(obj, match):
    with pytest.raises(PromptsError, match=match):
        parse_prompts(obj)
    assert issubclass(PromptsError, ConfigError)


def test_files(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps(PAIRS))
    assert load_prompts(good) == read_prompts(str(good)) == parse_prompts(PAIRS)
    assert read_prompts(None) == {}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptsError, match="bad.json is not valid JSON"):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(PromptsError, match="nope.json does not exist"):
        load_prompts(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------
# The same files through every command that takes --prompts


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for name, obj in (("pairs", PAIRS), ("templates", TEMPLATES)):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    files["bad"] = folder / "bad.json"
    files["bad"].write_text(json.dumps({"Edema": ["no negative"]}))
    return files


@pytest.fixture(scope="module")
def tiny_twin(tmp_path_factory):
    from cxrembed.data.synth import make_twin

    return make_twin(tmp_path_factory.mktemp("twin") / "nih", images=60, size=64, seed=3,
                     workers=0)


def _encode(twin, out, prompts=None):
    args = ["encode", str(twin), "--out", str(out), "--model", "cxr-tiny", "--pretrained",
            "none", "--batch-size", "32", "--index", "none", "--no-progress", "--json"]
    return CliRunner().invoke(
        __import__("cxrembed.cli", fromlist=["app"]).app,
        args + (["--prompts", str(prompts)] if prompts else []))


@pytest.fixture(scope="module")
def plain_store(tiny_twin, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.h5"
    result = _encode(tiny_twin, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pairs", "templates"])
def test_every_prompts_option_reads_the_same_file_alike(kind, prompt_files, tiny_twin,
                                                        plain_store, tmp_path):
    from cxrembed.cli import app
    from cxrembed.store import EmbeddingStore

    path = prompt_files[kind]
    expected = merge_prompts(load_prompts(path))
    # encode --prompts: stored with the store
    out = tmp_path / "with.h5"
    result = _encode(tiny_twin, out, path)
    assert result.exit_code == 0, result.output
    with EmbeddingStore.open(out) as store:
        stored = store.prompts
        assert {k: v for k, v in stored.items() if k != NO_FINDING} == expected
        text = store.text_embeddings()
        assert all(p in text for pos, neg in expected.values() for p in pos + neg)
    # zeroshot --prompts and fewshot --prompts on a store made with the defaults
    runner = CliRunner()
    zs = runner.invoke(app, ["zeroshot", str(plain_store), "--prompts", str(path),
                             "--bootstrap", "0", "--json"])
    assert zs.exit_code == 0, zs.output
    used = json.loads(zs.stdout)["source"]["prompts"]["prompts"]
    assert {k: (v[0], v[1]) for k, v in used.items()} == expected
    fs = runner.invoke(app, ["fewshot", str(plain_store), "--prompts", str(path), "--heads",
                             "zeroshot", "--shots", "1", "--seeds", "1", "--bootstrap", "0",
                             "--out", str(tmp_path / "fs"), "--no-progress", "--json"])
    assert fs.exit_code == 0, fs.output
    saved = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    used = saved["source"]["prompts"]["prompts"]
    assert {k: (v[0], v[1]) for k, v in used.items()} == expected


@pytest.mark.slow
def test_every_prompts_option_refuses_a_bad_file_alike(prompt_files, tiny_twin, plain_store,
                                                       tmp_path):
    from cxrembed.cli import app

    bad = str(prompt_files["bad"])
    runner = CliRunner()
    results = [
        _encode(tiny_twin, tmp_path / "bad.h5", bad),
        runner.invoke(app, ["zeroshot", str(plain_store), "--prompts", bad, "--bootstrap", "0"]),
        runner.invoke(app, ["fewshot", str(plain_store), "--prompts", bad, "--heads",
                            "zeroshot", "--shots", "1", "--seeds", "1", "--out",
                            str(tmp_path / "fs"), "--no-progress"]),
    ]
    for result in results:
        assert isinstance(result.exception, PromptsError), result.output
        assert "bad.json" in str(result.exception) and "'Edema'" in str(result.exception)
    assert not (tmp_path / "bad.h5").exists()  # refused before anything was written
    assert np.all([r.exit_code != 0 for r in results])
