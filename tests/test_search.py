"""Similarity search: results equal a numpy brute-force top-k; filters; bad queries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrembed.errors import ConfigError, DataError, StoreError
from cxrembed.labels import LABELS
from cxrembed.search import exact_scan, search, search_vectors
from cxrembed.store import EmbeddingStore, StoreWriter, build_index

N, D = 1200, 32
TEXT = {"Edema": (["a chest x-ray showing edema"], ["no edema"]),
        "No Finding": (["no finding"], [])}


def make_store(path, *, text: bool = True, n: int = N, seed: int = 0):
    """Clustered unit-ish vectors, 1-7 images per patient, three splits."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(1, n + 1), rng.integers(1, 8, n))[:n]
    follow = np.concatenate([np.arange(c) for c in np.bincount(patients)[1:] if c])[:n]
    ids = np.array([f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow)])
    centres = rng.normal(size=(25, D))
    # Images of one patient sit close together, as follow-ups do.
    per_patient = (centres[rng.integers(0, 25, patients.max() + 1)]
                   + 0.8 * rng.normal(size=(patients.max() + 1, D)))
    vectors = per_patient[patients] + 0.3 * rng.normal(size=(n, D))
    rows = {"image_id": ids, "patient_id": patients.astype(np.int64),
            "follow_up": follow.astype(np.int64),
            "split": np.array(["train", "val", "test"])[patients % 3],
            "view": np.array(["PA", "AP"])[rng.integers(0, 2, n)],
            "sex": np.array(["M", "F"])[rng.integers(0, 2, n)],
            "age": rng.integers(1, 90, n).astype(np.float32),
            "labels": (rng.random((n, len(LABELS))) < 0.15).astype(np.uint8),
            "image_path": ids}
    text_vectors = rng.normal(size=(3, D)) if text else None
    with StoreWriter.create(path, rows=rows, embed_dim=D, fingerprint={"model": "synthetic"},
                            has_head=False, has_text=text, batch_size=100, chunk_rows=400,
                            prompts=TEXT if text else None, text_embeddings=text_vectors,
                            attrs={"model_name": "synthetic"}) as writer:
        writer.append(vectors.astype(np.float32))
        writer.finish()
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = make_store(tmp_path_factory.mktemp("s") / "s.h5")
    build_index(path)
    return path


@pytest.fixture()
def store(store_path):
    with EmbeddingStore.open(store_path) as opened:
        yield opened


def brute_force(x: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray):
    sims = x @ query
    sims[~allowed] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    order = order[np.isfinite(sims[order])]
    return order, sims[order]


@pytest.mark.parametrize("index", ["index", "exact"])
@pytest.mark.parametrize("split,exclude", [(None, False), ("test", False), (None, True),
                                           ("train", True)])
def test_search_by_id_equals_numpy_top_k(store, index, split, exclude):
    x = store.embeddings()
    for row in (0, 7, 555, N - 1):
        hits = search(store, image_id=store.image_id[row], k=10, split=split,
                      exclude_same_patient=exclude, index=index)
        allowed = np.ones(N, bool) if split is None else store.split == split
        allowed[row] = False
        if exclude:
            allowed &= store.patient_id != store.patient_id[row]
        rows, sims = brute_force(x, x[row], 10, allowed)
        assert [h.row for h in hits] == list(rows)
        np.testing.assert_allclose([h.similarity for h in hits], sims, rtol=1e-5, atol=1e-6)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        hit = hits[0]
        assert hit.image_id == store.image_id[hit.row]
        assert hit.labels == [LABELS[j] for j in np.flatnonzero(store.labels[hit.row])]


def test_exclude_same_patient_never_returns_the_patient(store):
    many = np.flatnonzero(np.bincount(store.patient_id)[store.patient_id] >= 5)
    assert len(many)  # the fixture has patients with several images, nearest to each other
    for row in many[:20]:
        kept = search(store, image_id=store.image_id[row], k=10)
        assert any(h.patient_id == store.patient_id[row] for h in kept)  # the filter matters
        hits = search(store, image_id=store.image_id[row], k=10, exclude_same_patient=True)
        assert len(hits) == 10
        assert all(h.patient_id != store.patient_id[row] for h in hits)


def test_include_query_puts_the_image_first(store):
    hits = search(store, image_id=store.image_id[42], k=3, include_query=True)
    assert hits[0].row == 42 and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert all(h.row != 42 for h in search(store, image_id=store.image_id[42], k=3))


def test_batched_vectors_equal_numpy(store):
    x = store.embeddings()
    queries = x[[3, 99, 400]] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims, rows = search_vectors(store, queries, 15)
    scan_sims, scan_rows = exact_scan(store, queries, 15)
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :15]
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_array_equal(scan_rows, truth)
    np.testing.assert_allclose(sims, scan_sims, rtol=1e-5, atol=1e-6)
    # Per-query exclusions: each query loses its own patient.
    patients = [int(store.patient_id[r]) for r in (3, 99, 400)]
    _, rows = search_vectors(store, queries, 15, exclude_patients=patients)
    for q, p in enumerate(patients):
        allowed = store.patient_id != p
        np.testing.assert_array_equal(rows[q], brute_force(x, queries[q], 15, allowed)[0])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(tmp_path, kind):
    path = make_store(tmp_path / "a.h5")
    build_index(path, kind)
    with EmbeddingStore.open(path) as store:
        x = store.embeddings()
        queries = x[::40]
        _, found = search_vectors(store, queries, 10, index="index")
        truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
        recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
        assert recall > 0.9, recall
        hits = search(store, image_id=store.image_id[5], k=10, split="val", index="index")
        assert all(h.split == "val" for h in hits)


def test_text_query_uses_the_stored_prompt(store):
    text = store.text_embeddings()["a chest x-ray showing edema"]
    hits = search(store, text="a chest x-ray showing edema", k=5)
    rows, _ = brute_force(store.embeddings(), text, 5, np.ones(N, bool))
    assert [h.row for h in hits] == list(rows)


def test_bad_queries_are_refused(store, tmp_path):
    with pytest.raises(StoreError, match="not in store"):
        search(store, image_id="99999999_000.png")
    with pytest.raises(ConfigError, match="-k 1201"):
        search(store, image_id=store.image_id[0], k=N + 1)
    with pytest.raises(ConfigError, match="-k 0"):
        search(store, image_id=store.image_id[0], k=0)
    with pytest.raises(ConfigError, match="exactly one"):
        search(store, image_id=store.image_id[0], text="edema")
    with pytest.raises(ConfigError, match="exactly one"):
        search(store)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a PNG")
    with pytest.raises(DataError, match="cannot decode"):
        search(store, image=not_image)
    with pytest.raises(DataError, match="does not exist"):
        search(store, image=tmp_path / "absent.png")
    with pytest.raises(ConfigError, match="cannot tell the patient"):
        search(store, text="a chest x-ray showing edema", exclude_same_patient=True)


def test_text_query_without_text_tower(tmp_path):
    path = make_store(tmp_path / "vision.h5", text=False)
    with pytest.raises(StoreError, match="no text tower"):
        search(path, text="pleural effusion")


def test_montage_png(store, tmp_path):
    from PIL import Image

    out = tmp_path / "m.png"
    hits = search(store, image_id=store.image_id[10], k=7, montage=out)  # images absent:
    assert len(hits) == 7                                                 # placeholders
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 300


def test_cli_search_json_and_errors(store_path):
    from typer.testing import CliRunner

    from cxrembed.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["search", str(store_path), "--id", "00000001_000.png", "-k",
                                 "4", "--exclude-same-patient", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    hits = body["hits"]
    assert len(hits) == 4 and all(h["patient_id"] != 1 for h in hits)
    assert body["query"] == {"kind": "id", "value": "00000001_000.png", "row": 0,
                             "patient_id": 1}
    # a store without a recorded figure: auto leaves it uncentred, and says why
    assert body["centring"]["centred"] is False and body["centring"]["choice"] == "auto"
    assert "records no centring figure" in body["centring"]["reason"]
    result = runner.invoke(app, ["search", str(store_path), "--id", "nope.png"])
    assert isinstance(result.exception, StoreError)


def test_search_by_new_image_with_the_stores_encoder(tmp_path):
    """A new image is encoded with the store's own (reloaded) encoder."""
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    nih = load_nih(make_twin(tmp_path / "nih", images=40, size=64, seed=2, workers=0))
    out = tmp_path / "tiny.h5"
    encode_dataset(nih, out, load_encoder(model="cxr-tiny", pretrained="none"), batch_size=20,
                   progress=False)
    path = nih.path[7]
    hits = search(out, image=path, k=3, include_query=True, montage=tmp_path / "m.png")
    assert hits[0].image_id == nih.image_id[7] and hits[0].similarity > 0.999
    hits = search(out, image=path, k=5, exclude_same_patient=True)
    assert all(h.patient_id != nih.patient_id[7] for h in hits)
    assert (tmp_path / "m.png").stat().st_size > 0
