"""The HDF5 store and its FAISS index, on synthetic vectors (no model, no images)."""

from __future__ import annotations

import json
import tracemalloc

import h5py
import numpy as np
import pytest

from cxrembed.errors import ConfigError, StoreError
from cxrembed.labels import LABELS
from cxrembed.store import (FORMAT_VERSION, EmbeddingStore, StoreWriter, build_index,
                            check_same_encoder, index_path, load_index)

FINGERPRINT = {"model": "synthetic", "weights": {"kind": "none"}, "labels": list(LABELS)}
PROMPTS = {"Edema": (["a chest x-ray showing edema"], ["no edema"]),
           "No Finding": (["no finding"], [])}


def synthetic_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image_id": np.array([f"{i // 4 + 1:08d}_{i % 4:03d}.png" for i in range(n)]),
        "patient_id": (np.arange(n) // 4 + 1).astype(np.int64),
        "follow_up": (np.arange(n) % 4).astype(np.int64),
        "split": np.array(["train", "val", "test"])[(np.arange(n) // 4) % 3],
        "view": np.array(["PA", "AP"])[rng.integers(0, 2, n)],
        "sex": np.array(["M", "F"])[rng.integers(0, 2, n)],
        "age": np.where(rng.random(n) < 0.1, np.nan, rng.integers(1, 90, n)).astype(np.float32),
        "labels": (rng.random((n, len(LABELS))) < 0.15).astype(np.uint8),
        "image_path": np.array([f"images_001/images/{i // 4 + 1:08d}_{i % 4:03d}.png"
                                for i in range(n)]),
    }


def write_store(path, vectors: np.ndarray, *, head: bool = False, text: bool = False,
                finish: bool = True, batch: int = 16, chunk: int = 64, fingerprint=None,
                seed: int = 0) -> dict[str, np.ndarray]:
    n, d = vectors.shape
    rows = synthetic_rows(n, seed)
    text_vectors = np.random.default_rng(1).normal(size=(3, d)) if text else None
    writer = StoreWriter.create(path, rows=rows, embed_dim=d,
                                fingerprint=fingerprint or FINGERPRINT, has_head=head,
                                has_text=text, batch_size=batch, chunk_rows=chunk,
                                prompts=PROMPTS if text else None, text_embeddings=text_vectors,
                                attrs={"model_name": "synthetic"})
    with writer:
        for start in range(0, n, batch):
            block = vectors[start:start + batch]
            writer.append(block, block[:, :14] * 3 if head else None)
        if finish:
            writer.finish()
    rows["text_vectors"] = text_vectors
    return rows


@pytest.fixture()
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)


def test_metadata_and_vectors_round_trip(tmp_path, vectors):
    rows = write_store(tmp_path / "s.h5", vectors)
    with EmbeddingStore.open(tmp_path / "s.h5") as store:
        assert len(store) == 300 and store.embed_dim == 32 and store.complete
        for name in ("image_id", "patient_id", "follow_up", "split", "view", "sex", "labels",
                     "image_path"):
            np.testing.assert_array_equal(getattr(store, name), rows[name], err_msg=name)
        np.testing.assert_array_equal(np.isnan(store.age), np.isnan(rows["age"]))
        assert store.attrs["format_version"] == FORMAT_VERSION
        assert store.fingerprint == FINGERPRINT
        raw = store.embeddings(normalized=False)
        np.testing.assert_array_equal(raw, vectors.astype(np.float16).astype(np.float32))
        unit = store.embeddings()
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
        expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_allclose(unit, expected, atol=2e-3)


def test_embeddings_of_rows_in_the_order_asked(tmp_path, vectors):
    write_store(tmp_path / "s.h5", vectors)
    with EmbeddingStore.open(tmp_path / "s.h5") as store:
        full = store.embeddings()
        rows = np.array([299, 3, 150, 3, 0, 77])
        np.testing.assert_array_equal(store.embeddings(rows), full[rows])
        mask = np.zeros(300, bool)
        mask[[5, 9]] = True
        np.testing.assert_array_equal(store.embeddings(mask), full[[5, 9]])
        assert store.embeddings([]).shape == (0, 32)
        with pytest.raises(ConfigError, match="out of range"):
            store.embeddings([300])


def test_embeddings_memory_follows_the_request(tmp_path):
    big = np.random.default_rng(0).normal(size=(40_000, 64)).astype(np.float32)
    write_store(tmp_path / "big.h5", big, batch=1000, chunk=8000)
    with EmbeddingStore.open(tmp_path / "big.h5") as store:
        tracemalloc.start()
        try:
            few = store.embeddings([10, 20_000, 39_999])
            _, peak_few = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            store.embeddings()
            _, peak_all = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert few.shape == (3, 64)
    assert peak_all > 10 * 2**20  # 40k x 64 float32 is 10 MiB
    assert peak_few < 1 * 2**20, f"3 rows took {peak_few / 2**20:.1f} MiB"


def test_select_matches_numpy(tmp_path, vectors):
    rows = write_store(tmp_path / "s.h5", vectors)
    with EmbeddingStore.open(tmp_path / "s.h5") as store:
        np.testing.assert_array_equal(store.select(split="test"),
                                      np.flatnonzero(rows["split"] == "test"))
        np.testing.assert_array_equal(
            store.select(split="train", view="pa"),
            np.flatnonzero((rows["split"] == "train") & (rows["view"] == "PA")))
        edema = LABELS.index("Edema")
        np.testing.assert_array_equal(store.select(label="edema"),
                                      np.flatnonzero(rows["labels"][:, edema] == 1))
        np.testing.assert_array_equal(store.select(label="No Finding"),
                                      np.flatnonzero(rows["labels"].sum(axis=1) == 0))
        with pytest.raises(ConfigError):
            store.select(split="training")


def test_incomplete_store_is_refused_unless_asked(tmp_path, vectors):
    path = tmp_path / "part.h5"
    write_store(path, vectors, finish=False, batch=16, chunk=64)  # 4 chunks of 64 committed
    with pytest.raises(StoreError, match="incomplete.*--resume"):
        EmbeddingStore.open(path)
    with EmbeddingStore.open(path, allow_incomplete=True) as store:
        assert len(store) == 256 and not store.complete
        np.testing.assert_array_equal(store.embeddings(normalized=False),
                                      vectors[:256].astype(np.float16).astype(np.float32))
        assert len(store.image_id) == 256
    with pytest.raises(StoreError, match="no rows|incomplete"):
        build_index(path)


def test_other_format_version_is_refused(tmp_path, vectors):
    path = tmp_path / "old.h5"
    write_store(path, vectors)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1}"):
        EmbeddingStore.open(path)


def test_files_that_are_not_stores_are_refused(tmp_path):
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(StoreError, match="cannot open"):
        EmbeddingStore.open(tmp_path / "notes.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a cxrembed store"):
        EmbeddingStore.open(tmp_path / "other.h5")
    with pytest.raises(StoreError, match="does not exist"):
        EmbeddingStore.open(tmp_path / "absent.h5")


def test_fingerprint_check_refuses_different_encoders(tmp_path, vectors):
    write_store(tmp_path / "a.h5", vectors)
    other = {**FINGERPRINT, "weights": {"kind": "file", "sha256": "ab" * 32}}
    write_store(tmp_path / "b.h5", vectors, fingerprint=other)
    with EmbeddingStore.open(tmp_path / "a.h5") as a, EmbeddingStore.open(tmp_path / "b.h5") as b:
        check_same_encoder(a, json.loads(json.dumps(FINGERPRINT)))  # lists/tuples alike
        with pytest.raises(StoreError, match="different encoders.*weights"):
            check_same_encoder(a, b)


def test_head_logits_and_text(tmp_path, vectors):
    rows = write_store(tmp_path / "h.h5", vectors, head=True, text=True)
    with EmbeddingStore.open(tmp_path / "h.h5") as store:
        assert store.has_head and store.has_text
        np.testing.assert_allclose(store.head_logits([4, 1]), vectors[[4, 1], :14] * 3,
                                   rtol=1e-6)
        assert store.prompts == PROMPTS
        text = store.text_embeddings()
        assert list(text) == ["a chest x-ray showing edema", "no edema", "no finding"]
        expected = rows["text_vectors"] / np.linalg.norm(rows["text_vectors"], axis=1,
                                                          keepdims=True)
        np.testing.assert_allclose(np.stack(list(text.values())), expected, rtol=1e-5)
        np.testing.assert_allclose(store.encode_prompts(["no edema"])[0], expected[1],
                                   rtol=1e-5)  # stored: no model needed
    write_store(tmp_path / "plain.h5", vectors)
    with EmbeddingStore.open(tmp_path / "plain.h5") as store:
        with pytest.raises(StoreError, match="no adapted-head logits"):
            store.head_logits()
        with pytest.raises(StoreError, match="no text tower"):
            store.text_embeddings()


def test_non_finite_vectors_are_refused(tmp_path, vectors):
    bad = vectors.copy()
    bad[70, 3] = 1e6  # beyond float16
    with pytest.raises(StoreError, match="row 70"):
        write_store(tmp_path / "bad.h5", bad)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_built_beside_the_store_and_searchable(tmp_path, kind):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    vectors = (centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32)))
    write_store(tmp_path / "s.h5", vectors.astype(np.float32), batch=100, chunk=500)
    path = build_index(tmp_path / "s.h5", kind)
    assert path == index_path(tmp_path / "s.h5") == tmp_path / "s.faiss"
    with EmbeddingStore.open(tmp_path / "s.h5") as store:
        loaded = load_index(store)
        assert loaded.info.kind == kind and loaded.index.ntotal == 2000
        x = store.embeddings()
        truth = np.argsort(-(x[:50] @ x.T), axis=1)[:, :10]
        _, found = loaded.index.search(x[:50], 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall == 1.0 if kind == "flat" else recall > 0.9


def test_index_is_memory_mapped(tmp_path):
    import os

    vectors = np.random.default_rng(0).normal(size=(60_000, 128)).astype(np.float32)
    write_store(tmp_path / "m.h5", vectors, batch=1000, chunk=10_000)
    build_index(tmp_path / "m.h5")  # 60k x 128 float32 = 29 MiB of codes

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with EmbeddingStore.open(tmp_path / "m.h5") as store:
        before = rss()
        loaded = load_index(store)
        grown = rss() - before
        assert loaded.index.ntotal == 60_000
    assert grown < 8 * 2**20, f"loading the index grew the process by {grown / 2**20:.0f} MiB"


def test_index_of_another_encode_is_refused(tmp_path, vectors):
    write_store(tmp_path / "s.h5", vectors)
    build_index(tmp_path / "s.h5")
    (tmp_path / "s.h5").unlink()
    write_store(tmp_path / "s.h5", vectors)  # same path, new encode: the old index is stale
    with EmbeddingStore.open(tmp_path / "s.h5") as store:
        with pytest.raises(StoreError, match="another encode"):
            load_index(store)
    with pytest.raises(ConfigError, match="unknown index kind"):
        build_index(tmp_path / "s.h5", "lsh")
