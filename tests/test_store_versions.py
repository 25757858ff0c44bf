"""Store format versions: a version-1 store, written here with the old layout by h5py
directly (not by today's writer), is read by this cxrembed, searched, and, when
unfinished, resumed and finished as version 2; a version past 2 is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrembed.errors import StoreError
from cxrembed.labels import LABELS
from cxrembed.store import (FORMAT_VERSION, EmbeddingStore, StoreWriter, build_index,
                            load_index, search_index)
from cxrembed.store.schema import READABLE_VERSIONS

N, DIM = 60, 16
FINGERPRINT = {"model": "v1-era"}


def write_v1_store(path, *, earliest: bool, complete: bool = True, rows_done: int = N):
    """A store as cxrembed wrote format version 1, written field by field with h5py. The
    ``earliest`` v1 files also lack label_names, label_known, head_label_names, dataset."""
    import h5py

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(N, DIM)).astype(np.float16)
    labels = (rng.random((N, 14)) < 0.2).astype(np.uint8)
    with h5py.File(path, "w") as f:
        attrs = {"format": "cxrembed.store", "format_version": 1, "cxrembed_version": "0.1.0",
                 "uuid": "0" * 32, "created": "2026-06-01T00:00:00+00:00",
                 "finished": "2026-06-01T00:01:00+00:00" if complete else "",
                 "complete": complete, "num_rows": N, "embed_dim": DIM, "model_name": "cxr-tiny",
                 "weights_source": "none", "weights_sha256": "", "run": "",
                 "fingerprint": json.dumps(FINGERPRINT), "preprocessing": json.dumps({}),
                 "load_args": "", "has_head": False, "has_text": True, "batch_size": 10,
                 "chunk_rows": 20, "dataset_root": "", "dataset_sources": json.dumps({}),
                 "selection": json.dumps({"splits": None, "limit": None})}
        if not earliest:
            attrs.update(label_names=json.dumps(list(LABELS)), dataset="nih")
        for key, value in attrs.items():
            f.attrs[key] = value
        ids = np.array([f"{i:08d}_000.png" for i in range(N)])
        f["image_id"] = np.char.encode(ids, "utf-8")
        f["patient_id"] = np.arange(N, dtype=np.int64) // 3
        f["follow_up"] = np.zeros(N, np.int64)
        f["split"] = np.char.encode(np.array(["train", "val", "test"] * (N // 3)), "utf-8")
        f["view"] = np.char.encode(np.array(["PA"] * N), "utf-8")
        f["sex"] = np.char.encode(np.array(["F"] * N), "utf-8")
        f["age"] = np.full(N, 40, np.float32)
        f["labels"] = labels
        f["image_path"] = np.char.encode(ids, "utf-8")
        if not earliest:
            f["label_known"] = np.ones((N, 14), np.uint8)
        f.create_dataset("embedding", data=np.where(np.arange(N)[:, None] < rows_done,
                                                    vectors, 0).astype(np.float16))
        f["embedding_norm"] = np.linalg.norm(vectors.astype(np.float32), axis=1) * (
            np.arange(N) < rows_done)
        f["rows_done"] = np.array([rows_done], np.int64)
        text = f.create_group("text")
        text.attrs["prompts"] = json.dumps({"Effusion": [["effusion"], ["no effusion"]]})
        text.create_dataset("prompt", data=np.array(["effusion", "no effusion"], dtype=object),
                            dtype=h5py.string_dtype())
        text["embedding"] = rng.normal(size=(2, DIM)).astype(np.float32)
    return vectors.astype(np.float32), labels


@pytest.mark.parametrize("earliest", [True, False])
def test_a_version_1_store_is_read_and_searched_as_it_is(tmp_path, earliest):
    path = tmp_path / "v1.h5"
    vectors, labels = write_v1_store(path, earliest=earliest)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    with EmbeddingStore.open(path) as store:
        assert store.attrs["format_version"] == 1 and len(store) == N
        np.testing.assert_allclose(store.embeddings(), unit, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(store.labels, labels)
        assert store.label_known.all() and store.label_names == list(LABELS)
        assert store.dataset == "nih" and list(store.select(split="test")) == list(range(2, N, 3))
        assert store.prompts == {"Effusion": (["effusion"], ["no effusion"])}
    build_index(path)
    with EmbeddingStore.open(path) as store:
        sims, rows = search_index(load_index(store).index, unit[:5], k=4)
    brute = np.argsort(-(unit[:5] @ unit.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(rows, brute)
    np.testing.assert_allclose(sims, np.take_along_axis(unit[:5] @ unit.T, brute, 1), atol=1e-5)


def test_an_unfinished_version_1_store_is_resumed_and_finished_as_version_2(tmp_path):
    path = tmp_path / "v1.h5"
    vectors, _ = write_v1_store(path, earliest=False, complete=False, rows_done=20)
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore.open(path)
    with StoreWriter.resume(path, fingerprint=FINGERPRINT) as writer:
        assert writer.rows_done == 20
        for start in range(20, N, 10):
            writer.append(vectors[start:start + 10])
        writer.finish()
    with EmbeddingStore.open(path) as store:
        assert store.complete and store.attrs["format_version"] == FORMAT_VERSION == 2
        np.testing.assert_array_equal(store.embeddings(normalized=False),
                                      vectors.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("version", [0, 3, "2", 2.5, True])
def test_other_versions_are_refused_by_name(tmp_path, version):
    import h5py

    path = tmp_path / "v.h5"
    write_v1_store(path, earliest=False)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = version
    readable = ", ".join(map(str, READABLE_VERSIONS))
    with pytest.raises(StoreError, match=rf"format version .*{readable}"):
        EmbeddingStore.open(path)
    with pytest.raises(StoreError, match="format version"):
        StoreWriter.resume(path, fingerprint=FINGERPRINT)
