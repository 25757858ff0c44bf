"""Prompt files, label maps, run configs, store attributes and head cards, fed hostile
content: only cxrembed's own errors escape."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxrembed.errors import CxrembedError
from fuzz_inputs import cell, csv_file, folder, json_value, only_cxrembed_errors

pytestmark = pytest.mark.timeout(120)
DIM = 8


@given(content=st.one_of(json_value.map(lambda v: json.dumps(v).encode()),
                         st.fixed_dictionaries({}, optional={
                             "templates": json_value | st.sampled_from([
                                 ["a {disease}", "no {disease}"], ["{", "}"], ["{0}", "x"],
                                 ["{disease.x}", "y"], ["{disease!r:>{9}}", "z"]]),
                             "Effusion": json_value, "No Finding": json_value,
                             "effusion": json_value, "bogus": json_value}
                         ).map(lambda v: json.dumps(v).encode()),
                         st.binary(max_size=60)))
def test_prompt_files(content):
    from cxrembed.prompts import class_prompts, load_prompts

    with folder() as root:
        (root / "p.json").write_bytes(content)
        only_cxrembed_errors(lambda: load_prompts(root / "p.json"))
        only_cxrembed_errors(lambda: class_prompts(str(root / "p.json")))


@given(content=csv_file(("nih", "chexpert", "padchest")),
       pair=st.sampled_from([("nih", "chexpert"), ("chexpert", "nih"), ("nih", "x")]))
def test_label_maps(content, pair):
    from cxrembed.labelmap import load_label_map

    with folder() as root:
        (root / "map.csv").write_bytes(content)
        loaded = only_cxrembed_errors(lambda: load_label_map(root / "map.csv"))
        if loaded is not None:
            only_cxrembed_errors(lambda: loaded.pairs(*pair, ["Effusion", "Mass"],
                                                      ["Pleural Effusion", "Mass"]))


ADAPT_KEYS = ("epochs", "batch_size", "lr_head", "lr_encoder", "view", "unfreeze", "workers",
              "focal_alpha", "aug_scale_min", "val_fraction", "seed", "amp", "config",
              "bogus")


@given(values=st.one_of(json_value, st.dictionaries(st.sampled_from(ADAPT_KEYS),
                                                    json_value | cell, max_size=4)),
       wrap=st.booleans(), raw=st.none() | st.binary(max_size=40))
def test_adapt_config_files(values, wrap, raw):
    from cxrembed.adapt.config import AdaptConfig

    with folder() as root:
        content = raw if raw is not None else json.dumps(
            {"config": values} if wrap else values).encode()
        (root / "c.json").write_bytes(content)
        only_cxrembed_errors(lambda: AdaptConfig.from_file(root / "c.json"))


# ---------------------------------------------------------------------------------------
# Store attributes


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    from cxrembed.prompts import default_prompts, distinct_prompts
    from cxrembed.store import StoreWriter
    from cxrembed.store.schema import ROW_FIELDS

    n, rng, classes = 120, np.random.default_rng(0), ["Effusion", "Mass"]  # 2: fast heads
    rows = {name: (np.array([f"{i:03d}.png" for i in range(n)]) if name == "image_id" else
                   np.array(["train", "val", "test"] * (n // 3)) if name == "split" else
                   (rng.random((n, 2)) < 0.3).astype(np.uint8) if name == "labels" else
                   np.arange(n) // 2 if name == "patient_id" else
                   np.array([""] * n) if kind == "S" else np.zeros(n, kind))
            for name, kind in ROW_FIELDS.items()}
    prompts = default_prompts(classes)
    path = tmp_path_factory.mktemp("store") / "s.h5"
    writer = StoreWriter.create(path, rows=rows, embed_dim=DIM, fingerprint={"model": "fz"},
                                has_head=True, has_text=True, batch_size=40, chunk_rows=40,
                                label_names=classes, head_label_names=classes,
                                prompts=prompts, text_embeddings=rng.normal(
                                    size=(len(distinct_prompts(prompts)), DIM)))
    for start in range(0, n, 40):
        writer.append(rng.normal(size=(40, DIM)), rng.normal(size=(40, 2)))
    writer.finish()
    writer.close()
    return path


ATTRS = ("num_rows", "embed_dim", "complete", "format_version", "label_names",
         "head_label_names", "has_head", "has_text", "fingerprint", "load_args", "format",
         "embedding_health", "dataset", "run", "chunk_rows", "skipped_images", "mean")
DATASETS = ("embedding", "embedding_norm", "labels", "label_known", "image_id", "rows_done",
            "head_logits", "split", "text/embedding", "text/prompt")
attr_value = st.one_of(st.integers(-5, 500), st.booleans(), st.floats(), st.text(max_size=8),
                       json_value.map(json.dumps), st.sampled_from([
                           '["a"]', '["Mass"]', '["Effusion", "Mass"]', "{}", "[]", "null",
                           "[1, 2]", "{"]))


@given(set_attrs=st.dictionaries(st.sampled_from(ATTRS), attr_value, max_size=3),
       drop_attrs=st.lists(st.sampled_from(ATTRS), max_size=2),
       reshape=st.lists(st.tuples(st.sampled_from(DATASETS), st.integers(0, 130),
                                  st.integers(0, 16)), max_size=2),
       rows_done=st.none() | st.integers(-3, 200))
def test_store_attributes_that_lie(good_store, set_attrs, drop_attrs, reshape, rows_done):
    import h5py

    from cxrembed.store import EmbeddingStore, check_same_encoder

    with folder() as root:
        path = root / "s.h5"
        shutil.copy(good_store, path)
        with h5py.File(path, "r+") as f:
            for key, value in set_attrs.items():
                f.attrs[key] = value
            for key in drop_attrs:
                if key in f.attrs:
                    del f.attrs[key]
            for name, rows, width in reshape:
                if name in f:
                    old = f[name]
                    shape = (rows,) + ((width,) if old.ndim == 2 else ())
                    dtype = old.dtype
                    del f[name]
                    f.create_dataset(name, shape=shape, dtype=dtype)
            if rows_done is not None and "rows_done" in f and f["rows_done"].shape == (1,):
                f["rows_done"][0] = rows_done

        def use() -> None:
            with EmbeddingStore.open(path, allow_incomplete=True) as store:
                n = len(store)
                assert store.embeddings().shape == (n, store.embed_dim)
                assert store.norms().shape == (n,)
                assert store.labels.shape == (n, len(store.label_names))
                store.select(split="train")
                if store.has_head:
                    assert store.head_logits().shape == (n, len(store.head_label_names))
                if store.has_text:
                    prompts = store.prompts
                    vectors = store.text_embeddings()
                    assert all(len(v) == store.embed_dim for v in vectors.values())
                    assert set(p for pair in prompts.values() for s in pair for p in s) <= set(
                        vectors)
                check_same_encoder(store, store)

        only_cxrembed_errors(use)


# ---------------------------------------------------------------------------------------
# Head cards


@pytest.fixture(scope="module")
def good_heads(good_store, tmp_path_factory):
    import torch  # noqa: F401 - imported once here, not inside a timed example (mlp heads)

    from cxrembed.fewshot.fit import fit_head

    out = tmp_path_factory.mktemp("heads")
    for kind in ("linear", "knn"):
        fit_head(good_store, kind, shots=2, seed=0, out=out / kind,
                 options={"Cs": [1.0]} if kind == "linear" else None)
    return out


CARD_KEYS = ("format", "format_version", "kind", "options", "selected", "embed_dim",
             "label_names", "calibration", "fingerprint", "load_args", "input", "score_kind")


@given(kind=st.sampled_from(["linear", "knn"]),
       set_keys=st.dictionaries(st.sampled_from(CARD_KEYS), json_value | st.sampled_from(
           ["linear", "knn", "tip", "mlp", "zeroshot", "adapted", 1, 8, {"classes": {}}]),
           max_size=2),
       drop_keys=st.lists(st.sampled_from(CARD_KEYS), max_size=2),
       arrays=st.sampled_from(["keep", "garbage", "empty", "missing", "drop-one", "reshape"]),
       raw_card=st.none() | st.binary(max_size=30))
def test_head_cards(good_heads, kind, set_keys, drop_keys, arrays, raw_card):
    from cxrembed.heads.saved import load_head

    with folder() as root:
        head = root / "h"
        shutil.copytree(good_heads / kind, head)
        card = json.loads((head / "head.json").read_text())
        card.update(set_keys)
        for key in drop_keys:
            card.pop(key, None)
        (head / "head.json").write_bytes(raw_card if raw_card is not None
                                         else json.dumps(card).encode())
        if arrays == "garbage":
            (head / "head.npz").write_bytes(b"PK\x03\x04garbage")
        elif arrays == "empty":
            (head / "head.npz").write_bytes(b"")
        elif arrays == "missing":
            (head / "head.npz").unlink()
        elif arrays in ("drop-one", "reshape"):
            with np.load(head / "head.npz") as npz:
                kept = {k: npz[k] for k in npz.files}
            first = sorted(kept)[0]
            if arrays == "drop-one":
                del kept[first]
            else:
                kept[first] = np.zeros((3, 5))
            with open(head / "head.npz", "wb") as f:
                np.savez(f, **kept)

        def use() -> None:
            saved = load_head(head)
            out = saved.predict(np.ones((3, DIM), np.float32))
            assert out.probability.shape == (3, len(saved.label_names))

        only_cxrembed_errors(use)


assert issubclass(CxrembedError, Exception)
