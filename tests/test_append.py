"""`encode --append`: old rows kept bit for bit, new images after them, the index extended
without a rebuild, refusals, and resumption after an interruption."""

from __future__ import annotations

import numpy as np
import pytest

from cxrembed.errors import StoreError
from cxrembed.store import EmbeddingStore, load_index



@pytest.fixture(scope="module")
def setup(twin):
    from cxrembed.data import load_nih
    from cxrembed.model import load_encoder

    dataset = load_nih(twin, val_fraction=0.25)
    return dataset, load_encoder(model="cxr-tiny", pretrained="none")


def _encode(dataset, out, encoder, **kw):
    from cxrembed.encode import encode_dataset

    kw = {"batch_size": 16, "chunk_rows": 32, "progress": False, "workers": 0, **kw}
    return encode_dataset(dataset, out, encoder, **kw)


def _snapshot(path):
    with EmbeddingStore.open(path) as s:
        return {"ids": list(s.image_id), "emb": s.embeddings(normalized=False),
                "split": list(s.split), "labels": s.labels.copy(), "uuid": s.attrs["uuid"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_append_keeps_old_rows_and_extends_the_index(setup, tmp_path, kind):
    import faiss

    dataset, encoder = setup
    first = np.arange(160)
    out = tmp_path / "s.h5"
    _encode(dataset.subset(first), out, encoder, index=kind)
    before = _snapshot(out)
    old_index = faiss.read_index(str(out.with_suffix(".faiss")))
    result = _encode(dataset, out, encoder, append=True)
    after = _snapshot(out)
    assert result.encoded == len(dataset) - 160 and result.rows == len(dataset)
    assert after["ids"][:160] == before["ids"]  # row order stable
    np.testing.assert_array_equal(after["emb"][:160], before["emb"])  # bit for bit
    assert after["ids"][160:] == list(dataset.image_id[160:])
    np.testing.assert_array_equal(after["labels"][160:], dataset.labels[160:])
    full = tmp_path / "full.h5"
    _encode(dataset, full, encoder, index=None)
    np.testing.assert_allclose(after["emb"][160:], _snapshot(full)["emb"][160:], atol=2e-3)
    with EmbeddingStore.open(out) as store:
        loaded = load_index(store)  # the sidecar matches the new store (uuid, rows)
        assert loaded.index.ntotal == len(dataset)
        if kind == "ivf":  # the trained cells are kept: not rebuilt
            ivf = faiss.extract_index_ivf(loaded.index)
            old = faiss.extract_index_ivf(old_index)
            np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist),
                                          old.quantizer.reconstruct_n(0, old.nlist))
        if kind == "flat":
            from cxrembed.search import search_vectors

            queries = store.embeddings(np.arange(150, 170))
            sims, rows = search_vectors(store, queries, 5, index="index")
            exact = queries @ store.embeddings().T
            np.testing.assert_array_equal(rows[:, 0], np.arange(150, 170))
            np.testing.assert_allclose(sims, -np.sort(-exact, axis=1)[:, :5], atol=1e-5)
    again = _encode(dataset, out, encoder, append=True)  # nothing new: nothing done
    assert again.encoded == 0 and _snapshot(out)["ids"] == after["ids"]


@pytest.mark.slow
def test_append_refuses_another_encoder_and_a_split_leak(setup, tmp_path):
    from cxrembed.model import load_encoder

    dataset, encoder = setup
    out = tmp_path / "s.h5"
    _encode(dataset.subset(np.arange(100)), out, encoder, index=None)
    other = load_encoder(model="cxr-tiny", pretrained="none", quick_gelu=True)
    with pytest.raises(StoreError, match="different encoders"):
        _encode(dataset, out, other, append=True)
    leaky = dataset.subset(np.arange(len(dataset)))
    in_store = set(leaky.patient_id[:100])
    row = next(r for r in range(100, len(leaky)) if leaky.patient_id[r] in in_store)
    leaky.split[row] = "test" if leaky.split[row] != "test" else "train"
    with pytest.raises(StoreError, match=f"patient {leaky.patient_id[row]}"):
        _encode(leaky, out, encoder, append=True)
    assert len(_snapshot(out)["ids"]) == 100  # the store is untouched


@pytest.mark.slow
def test_interrupted_append_resumes_to_the_uninterrupted_store(setup, tmp_path, monkeypatch):
    from cxrembed.store import StoreWriter

    dataset, encoder = setup
    ref, cut = tmp_path / "ref.h5", tmp_path / "cut.h5"
    for path in (ref, cut):
        _encode(dataset.subset(np.arange(96)), path, encoder, index="flat")
    _encode(dataset, ref, encoder, append=True)
    real, calls = StoreWriter._write_chunk, []

    def dies_on_the_third_chunk(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "_write_chunk", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        _encode(dataset, cut, encoder, append=True)
    monkeypatch.setattr(StoreWriter, "_write_chunk", real)
    assert len(_snapshot(cut)["ids"]) == 96  # the store itself is untouched meanwhile
    result = _encode(dataset, cut, encoder, append=True)
    assert result.resumed_from == 96 + 64  # two chunks of new rows were kept
    a, b = _snapshot(ref), _snapshot(cut)
    assert a["ids"] == b["ids"]
    np.testing.assert_array_equal(a["emb"], b["emb"])


@pytest.mark.slow
def test_cli_encode_append(setup, tmp_path, twin):
    import json

    from typer.testing import CliRunner

    from cxrembed.cli import app

    out = tmp_path / "cli.h5"
    base = ["encode", str(twin), "--out", str(out), "--model", "cxr-tiny", "--pretrained",
            "none", "--val-fraction", "0.25", "--batch-size", "16", "--no-progress", "--json"]
    first = CliRunner().invoke(app, base + ["--split", "train"])
    assert first.exit_code == 0, first.output
    added = CliRunner().invoke(app, base + ["--append"])
    assert added.exit_code == 0, added.output
    summary = json.loads(added.stdout)
    n_train = json.loads(first.stdout)["rows"]
    assert summary["encoded"] == summary["rows"] - n_train > 0
    with EmbeddingStore.open(out) as store:
        assert list(store.split[:n_train]) == ["train"] * n_train
        assert set(store.split[n_train:]) == {"val", "test"}


def test_ctrl_c_hint_of_an_append_and_of_predict_is_to_rerun_the_same_command():
    from cxrembed.cli import app
    from cxrembed.cli.common import _resume_hint

    again = "rerun the same command to continue"
    assert again in _resume_hint(app, ["encode", "data", "--out", "s.h5", "--append"])
    assert "--resume" in _resume_hint(app, ["encode", "data", "--out", "s.h5"])
    assert again in _resume_hint(app, ["predict", "x.png", "--head", "h", "--out", "p.csv"])


def test_append_locks_its_work_file_and_the_store_only_for_the_swap(setup, tmp_path,
                                                                     monkeypatch):
    """While new images are encoded the finished store stays open to searches (its lock
    file is absent, the .appending one held); the store's lock is taken for the swap."""
    import os

    from cxrembed.encode.append import appending_path
    from cxrembed.store import lock as store_lock

    dataset, encoder = setup
    out = tmp_path / "s.h5"
    _encode(dataset.subset(np.arange(16)), out, encoder, index="flat")
    seen = {}
    real_encode, real_replace = encoder.encode_image, os.replace

    def encode_image(*args, **kwargs):
        seen.setdefault("encoding", (store_lock.held_here(out),
                                     store_lock.held_here(appending_path(out))))
        with EmbeddingStore.open(out) as store:  # a search meanwhile: the finished store
            seen.setdefault("rows", len(store))
        return real_encode(*args, **kwargs)

    def replace(src, dst):
        if str(dst) == str(out):
            seen["swap"] = store_lock.held_here(out)
        return real_replace(src, dst)

    monkeypatch.setattr(encoder, "encode_image", encode_image)
    monkeypatch.setattr(os, "replace", replace)
    result = _encode(dataset.subset(np.arange(32)), out, encoder, append=True)
    assert result.rows == 32 and result.encoded == 16
    assert seen == {"encoding": (False, True), "rows": 16, "swap": True}
    assert not store_lock.lock_path(out).exists()
    assert not store_lock.lock_path(appending_path(out)).exists()
