"""`cxrembed fit`'s out-of-distribution reference (fewshot/fit.py), searched in batches of
val queries, equals a brute-force numpy kNN over the train rows."""

from __future__ import annotations

import numpy as np

from cxrembed.fewshot import fit as fit_module
from cxrembed.labels import LABELS
from cxrembed.store import EmbeddingStore
from cxrembed.store.writer import StoreWriter

D = 16


def small_store(path, n=900, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:08d}_000.png" for i in range(n)])
    rows = {"image_id": ids, "patient_id": np.arange(n, dtype=np.int64),
            "follow_up": np.zeros(n, np.int64),
            "split": np.array(["train", "val", "val"])[np.arange(n) % 3],
            "view": np.full(n, "PA"), "sex": np.full(n, "F"),
            "age": np.full(n, 40, np.float32),
            "labels": (rng.random((n, len(LABELS))) < 0.2).astype(np.uint8), "image_path": ids}
    vectors = rng.normal(size=(n, D)) + 0.5 * rng.normal(size=(8, D))[rng.integers(0, 8, n)]
    with StoreWriter.create(path, rows=rows, embed_dim=D, fingerprint={"model": "t"},
                            has_head=False, has_text=False, batch_size=100, chunk_rows=300,
                            attrs={"model_name": "t"}) as writer:
        writer.append(vectors.astype(np.float32))
        writer.finish()
    return path


def test_ood_reference_in_query_batches_equals_brute_force(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_module, "OOD_QUERY_BATCH", 70)  # 600 val queries: 9 batches
    with EmbeddingStore.open(small_store(tmp_path / "s.h5")) as store:
        train = np.flatnonzero(store.split == "train")
        val = np.flatnonzero(store.split == "val")
        raw_val = store.embeddings(val, normalized=False)
        got = fit_module.ood_reference(store, raw_val, k=5)
        unit_train = store.embeddings(train, normalized=True).astype(np.float64)
    unit_val = raw_val / np.linalg.norm(raw_val, axis=1, keepdims=True)
    sims = np.sort(unit_val @ unit_train.T, axis=1)[:, -5:]
    expected = np.percentile(sims.mean(axis=1), 1)
    assert got["n_val"] == 600 and got["k"] == 5
    assert abs(got["val_p01"] - expected) < 1e-5
