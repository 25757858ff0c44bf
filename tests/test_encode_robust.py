"""encode and cache on bad input: fail fast, leave nothing behind, --skip-bad, resuming
after an image was removed; embedding health and per-stage timings in the result."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_encode import encode, fake_module, nih, reference  # noqa: F401 - fixtures

from cxrembed.errors import DataError, PromptsError, StoreError
from cxrembed.store import EmbeddingStore


def never_load():
    raise AssertionError("the model was loaded before the cheap checks")


@pytest.fixture()
def broken(nih, tmp_path):  # noqa: F811
    """A copy of the twin with one truncated PNG (row 50, of a patient with other images)."""
    from cxrembed.data.nih import load_nih

    root = shutil.copytree(nih.root, tmp_path / "nih")
    data = load_nih(root)
    row = next(r for r in range(50, len(data))
               if (data.patient_id == data.patient_id[r]).sum() > 1)
    path = data.path[row]
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    return {"data": data, "row": row, "id": str(data.image_id[row]), "path": path, "root": root}


def test_cheap_checks_come_before_the_model(nih, tmp_path, fake_module):  # noqa: F811
    out = tmp_path / "s.h5"
    encode(nih, out, fake_module.FakeEncoder(), limit=8, index=None)
    with pytest.raises(StoreError, match="already exists"):
        encode(nih, out, never_load, limit=8)
    (tmp_path / "bad.json").write_text(json.dumps({"Edema": "only a positive"}))
    with pytest.raises(PromptsError, match="bad.json"):
        encode(nih, tmp_path / "t.h5", never_load, prompts=tmp_path / "bad.json")
    with pytest.raises(DataError, match="cannot open pixel cache"):
        encode(nih, tmp_path / "t.h5", never_load, pixel_cache=tmp_path / "none.h5")
    assert not (tmp_path / "t.h5").exists()


def test_cli_encode_fails_fast_without_loading_the_model(nih, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    import cxrembed.model
    from cxrembed.cli import app

    monkeypatch.setattr(cxrembed.model, "load_encoder", lambda *a, **k: never_load())
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "empty"), "--out",
                                      str(tmp_path / "x.h5")])
    assert isinstance(result.exception, DataError), result.output
    (tmp_path / "x.h5").write_bytes(b"an earlier store")
    result = CliRunner().invoke(app, ["encode", str(nih.root), "--out", str(tmp_path / "x.h5")])
    assert isinstance(result.exception, StoreError) and "already exists" in str(result.exception)


def test_a_failed_start_leaves_nothing_behind(broken, tmp_path, fake_module):  # noqa: F811
    data = broken["data"].subset(np.arange(broken["row"], len(broken["data"])))
    out = tmp_path / "s.h5"
    for _ in range(2):  # the same command again: not refused as "already exists"
        with pytest.raises(DataError, match=broken["id"]):
            encode(data, out, fake_module.FakeEncoder())
        assert not out.exists() and not out.with_suffix(".faiss").exists()


def test_skip_bad_leaves_the_image_out_and_says_why(broken, reference, tmp_path,  # noqa: F811
                                                    fake_module):
    out = tmp_path / "s.h5"
    result = encode(broken["data"], out, fake_module.FakeEncoder(), skip_bad=True)
    assert result.rows == 119 and len(result.skipped) == 1
    assert result.skipped[0]["image_id"] == broken["id"]
    assert "truncated" in result.skipped[0]["reason"]
    keep = np.arange(120) != broken["row"]
    with EmbeddingStore.open(out) as store:
        assert store.attrs["skipped_images"] == result.skipped
        np.testing.assert_array_equal(store.image_id, broken["data"].image_id[keep])
        np.testing.assert_array_equal(store.labels, broken["data"].labels[keep])
        raw = store.embeddings(normalized=False)
        same_batch = (np.arange(120)[keep] // 8) == broken["row"] // 8
        np.testing.assert_array_equal(raw[~same_batch], reference["raw"][keep][~same_batch])
        np.testing.assert_allclose(raw, reference["raw"][keep], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(store.head_logits()[~same_batch],
                                      reference["logits"][keep][~same_batch])


def test_resume_after_the_bad_image_was_removed(broken, reference, tmp_path,  # noqa: F811
                                                fake_module):
    from cxrembed.data.nih import load_nih

    out = tmp_path / "s.h5"
    with pytest.raises(DataError, match=broken["id"]):
        encode(broken["data"], out, fake_module.FakeEncoder())
    with EmbeddingStore.open(out, allow_incomplete=True) as store:
        done = len(store)
    assert done == broken["row"] // 16 * 16  # whole chunks before the bad image are kept
    os.remove(broken["path"])
    smaller = load_nih(broken["root"], missing="drop")
    assert len(smaller) == 119
    second = fake_module.FakeEncoder()
    result = encode(smaller, out, second, resume=True)
    assert result.resumed_from == done and second.images_seen == 119 - done
    assert [s["image_id"] for s in result.skipped] == [broken["id"]]
    assert "no longer in the dataset" in result.skipped[0]["reason"]
    keep = np.arange(120) != broken["row"]
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.image_id, smaller.image_id)
        np.testing.assert_allclose(store.embeddings(normalized=False), reference["raw"][keep],
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(store.embeddings(np.arange(done), normalized=False),
                                      reference["raw"][:done])


def test_cache_skip_bad_and_resume_after_removal(broken, tmp_path, fake_module):  # noqa: F811
    from cxrembed.data.cache import PixelCache, build_pixel_cache
    from cxrembed.data.images import decode
    from cxrembed.data.nih import load_nih

    skipped = build_pixel_cache(broken["data"], tmp_path / "a.h5", workers=0, progress=False,
                                skip_bad=True)
    cache = PixelCache(skipped)
    assert list(cache.skipped) == [broken["id"]] and "truncated" in cache.skipped[broken["id"]]
    with pytest.raises(DataError, match=f"{broken['id']} was skipped"):
        cache.read(cache.rows_for([broken["id"]]))
    cache.close()
    result = encode(broken["data"], tmp_path / "s.h5", fake_module.FakeEncoder(),
                    pixel_cache=skipped, skip_bad=True, index=None)
    assert [s["image_id"] for s in result.skipped] == [broken["id"]]

    with pytest.raises(DataError, match=broken["id"]):
        build_pixel_cache(broken["data"], tmp_path / "b.h5", workers=0, progress=False)
    os.remove(broken["path"])
    smaller = load_nih(broken["root"], missing="drop")
    path = build_pixel_cache(smaller, tmp_path / "b.h5", workers=0, progress=False)
    cache = PixelCache(path)
    rows = cache.rows_for(smaller.image_id[[0, 60, 118]])
    expected = np.stack([decode(p) for p in smaller.path[[0, 60, 118]]])
    np.testing.assert_array_equal(cache.read(rows), expected)
    cache.close()


def test_health_is_measured_stored_and_warns_on_collapse(nih, reference, tmp_path,  # noqa: F811
                                                         fake_module, caplog):
    from cxrembed.store.health import HEALTH_ATTR

    with EmbeddingStore.open(reference["path"]) as store:
        health = store.attrs[HEALTH_ATTR]
        x = store.embeddings().astype(np.float64)
    cos = x @ x.T
    assert health["sample_size"] == 120
    assert health["mean_cosine"] == pytest.approx(cos[~np.eye(120, dtype=bool)].mean(), abs=1e-9)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    assert health["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert health["collapsed"] == (health["mean_cosine"] > 0.95)

    class Spread(fake_module.FakeEncoder):
        def encode_image(self, x):
            import torch

            super().encode_image(x)
            g = torch.Generator().manual_seed(self.batches)
            return torch.randn(len(x), self.embed_dim, generator=g)

    class Collapsed(fake_module.FakeEncoder):
        def encode_image(self, x):
            return super().encode_image(x) + 1000.0  # every vector points the same way

    with caplog.at_level(logging.WARNING):
        spread = encode(nih, tmp_path / "s.h5", Spread(), limit=40, index=None)
    assert abs(spread.embedding_health["mean_cosine"]) < 0.1
    assert not spread.embedding_health["collapsed"] and "collapsed" not in caplog.text
    with caplog.at_level(logging.WARNING):
        result = encode(nih, tmp_path / "c.h5", Collapsed(), limit=40, index=None)
    assert result.embedding_health["collapsed"] and result.embedding_health["mean_cosine"] > 0.95
    assert "collapsed" in caplog.text


def test_stage_seconds_in_the_result(nih, tmp_path, fake_module):  # noqa: F811
    result = encode(nih, tmp_path / "s.h5", fake_module.FakeEncoder(), index=None)
    stages = result.stage_seconds
    assert stages["batches"] == 15 and stages["images"] == 120
    assert min(stages["read"], stages["infer"], stages["write"]) >= 0
    assert stages["infer"] > 0 and stages["write"] > 0


@pytest.mark.slow
def test_per_batch_stage_seconds_with_verbose(nih, tmp_path):  # noqa: F811
    cmd = [sys.executable, "-m", "cxrembed", "-v", "encode", str(nih.root), "--out",
           str(tmp_path / "v.h5"), "--model", "cxr-tiny", "--pretrained", "none", "--limit",
           "24", "--batch-size", "8", "--index", "none", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch 2 (rows 8-15): read" in proc.stderr and "batch 3 (rows 16-23)" in proc.stderr
    assert "time per stage" in proc.stderr and "embedding health" in proc.stderr
