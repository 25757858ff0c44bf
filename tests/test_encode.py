"""``encode_dataset``: rows, vectors, prompts, and resuming after a kill or a full disk."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from cxrembed.errors import ConfigError, StoreError
from cxrembed.labels import LABELS, NO_FINDING_PROMPT, default_prompts
from cxrembed.store import EmbeddingStore, StoreWriter, index_path

# A tiny deterministic encoder satisfying the Encoder contract. Written to a file so that a
# child process (the SIGKILL test) imports the very same class.
FAKE_ENCODER = textwrap.dedent('''
    import os, signal
    import torch

    class FakeEncoder:
        """Pooled pixels times a fixed random matrix; counts the images it sees."""

        def __init__(self, dim=24, text=True, head=True, seed=0):
            g = torch.Generator().manual_seed(seed)
            self.proj = torch.randn(3 * 4 * 4, dim, generator=g)
            self.head_w = torch.randn(dim, 14, generator=g)
            self.model_name, self.embed_dim = "fake", dim
            self.has_text, self.has_head = text, head
            self.fingerprint = {"model": "fake", "seed": seed, "dim": dim}
            self.device = torch.device("cpu")
            self.run = "runs/fake" if head else None
            self.images_seen = 0
            self.kill_after = int(os.environ.get("FAKE_KILL_AFTER_BATCHES", "0"))
            self.batches = 0

        def encode_image(self, x):
            self.batches += 1
            if self.kill_after and self.batches > self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, mid-encode
            self.images_seen += len(x)
            pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
            return pooled @ self.proj + 0.5

        def head_logits(self, emb):
            return emb @ self.head_w

        def encode_text(self, prompts):
            rows = []
            for p in prompts:
                g = torch.Generator().manual_seed(sum(map(ord, p)) * 7919 % 2**31)
                rows.append(torch.randn(self.embed_dim, generator=g))
            return torch.stack(rows)
''')


@pytest.fixture(scope="module")
def fake_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake")
    (folder / "fake_encoder.py").write_text(FAKE_ENCODER)
    spec = importlib.util.spec_from_file_location("fake_encoder", folder / "fake_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FOLDER = folder
    return module


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin

    root = make_twin(tmp_path_factory.mktemp("twin") / "nih", images=120, size=64, seed=0,
                     workers=0)
    return load_nih(root)


@pytest.fixture(scope="module")
def reference(nih, fake_module, tmp_path_factory):
    """An uninterrupted encode (batch 8, chunks of 16) to compare the others with."""
    from cxrembed.encode import encode_dataset

    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    encode_dataset(nih, out, fake_module.FakeEncoder(), batch_size=8, chunk_rows=16,
                   progress=False, allow_other_data=True)
    with EmbeddingStore.open(out) as store:
        return {"path": out, "raw": store.embeddings(normalized=False),
                "logits": store.head_logits()}


def encode(nih, out, encoder, **kw):
    from cxrembed.encode import encode_dataset

    # The fake encoder names a run folder that does not exist: skip the check that the
    # data is split as that run's was.
    kw = {"batch_size": 8, "chunk_rows": 16, "progress": False, "allow_other_data": True, **kw}
    return encode_dataset(nih, out, encoder, **kw)


def direct_vectors(nih, encoder, rows):
    """What the encoder gives for these rows when called by hand (no pipeline)."""
    import torch

    from cxrembed.data.cache import ImageSource
    from cxrembed.data.transforms import to_clip_tensor

    pixels = ImageSource(nih).read(np.asarray(rows))
    with torch.inference_mode():
        return encoder.encode_image(to_clip_tensor(pixels)).float().numpy()


def test_rows_labels_ids_match_the_dataset(nih, reference):
    with EmbeddingStore.open(reference["path"]) as store:
        assert len(store) == len(nih) == 120
        for name in ("image_id", "patient_id", "follow_up", "split", "view", "sex", "labels"):
            np.testing.assert_array_equal(getattr(store, name), getattr(nih, name), name)
        np.testing.assert_array_equal(np.isnan(store.age), np.isnan(nih.age))
        assert (store.image_path != "").all()
        np.testing.assert_allclose(np.linalg.norm(store.embeddings(), axis=1), 1.0, atol=1e-6)
        assert store.attrs["model_name"] == "fake" and store.run == "runs/fake"
        assert store.attrs["complete"] and store.attrs["embed_dim"] == 24
        assert store.attrs["preprocessing"]["size"] == 224
    assert index_path(reference["path"]).is_file()


def test_vectors_and_logits_are_the_encoders(nih, reference, fake_module):
    encoder = fake_module.FakeEncoder()
    rows = [0, 17, 63, 119]
    direct = direct_vectors(nih, encoder, rows)
    np.testing.assert_array_equal(reference["raw"][rows],
                                  direct.astype(np.float16).astype(np.float32))
    import torch

    logits = encoder.head_logits(torch.from_numpy(direct)).numpy()
    np.testing.assert_allclose(reference["logits"][rows], logits, rtol=1e-5, atol=1e-5)


def test_default_prompts_and_text_embeddings_stored(reference, fake_module):
    with EmbeddingStore.open(reference["path"]) as store:
        prompts = store.prompts
        for name, (pos, neg) in default_prompts().items():
            assert prompts[name] == (pos, neg)
        assert prompts["No Finding"] == ([NO_FINDING_PROMPT], [])
        text = store.text_embeddings(normalized=False)
    assert "a chest x-ray showing edema" in text and "no edema" in text
    expected = fake_module.FakeEncoder().encode_text(["no edema"]).numpy()[0]
    np.testing.assert_allclose(text["no edema"], expected, rtol=1e-6)


def test_prompts_file(nih, tmp_path, fake_module):
    """The file is read by cxrembed.prompts (tests/test_prompts.py): here, what is stored."""
    per_class = tmp_path / "p.json"
    per_class.write_text(json.dumps({"edema": ["fluid in the lungs", "clear lungs"]}))
    out = tmp_path / "s.h5"
    encode(nih, out, fake_module.FakeEncoder(), prompts=per_class, limit=8, index=None)
    with EmbeddingStore.open(out) as store:
        assert store.prompts["Edema"] == (["fluid in the lungs"], ["clear lungs"])
        assert store.prompts["Mass"] == default_prompts()["Mass"]  # the others: defaults
        assert "fluid in the lungs" in store.text_embeddings()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        encode(nih, tmp_path / "t.h5", fake_module.FakeEncoder(), prompts=tmp_path / "bad.json")
    assert not (tmp_path / "t.h5").exists()


def test_limit_and_split(nih, reference, tmp_path, fake_module):
    out = tmp_path / "test_only.h5"
    result = encode(nih, out, fake_module.FakeEncoder(), splits=["test"], limit=10)
    test_rows = np.flatnonzero(nih.split == "test")[:10]
    assert result.rows == result.encoded == 10
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.image_id, nih.image_id[test_rows])
        assert (store.split == "test").all()
        np.testing.assert_allclose(store.embeddings(normalized=False),
                                   reference["raw"][test_rows], rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="unknown split"):
        encode(nih, tmp_path / "x.h5", fake_module.FakeEncoder(), splits=["training"])


def test_pixel_cache_gives_the_same_vectors(nih, reference, tmp_path, fake_module):
    from cxrembed.data.cache import build_pixel_cache

    cache = build_pixel_cache(nih, tmp_path / "pixels.h5", workers=0, progress=False)
    out = tmp_path / "cached.h5"
    encode(nih, out, fake_module.FakeEncoder(), pixel_cache=cache)
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.embeddings(normalized=False), reference["raw"])


def test_existing_store_needs_resume_or_overwrite(nih, reference, tmp_path, fake_module):
    out = tmp_path / "s.h5"
    encode(nih, out, fake_module.FakeEncoder(), limit=16, index=None)
    with pytest.raises(StoreError, match="--resume.*--overwrite"):
        encode(nih, out, fake_module.FakeEncoder(), limit=16)
    result = encode(nih, out, fake_module.FakeEncoder(), limit=16, resume=True)
    assert result.encoded == 0 and result.index is not None  # complete: only the index made
    with pytest.raises(StoreError, match="other images"):
        encode(nih, out, fake_module.FakeEncoder(), limit=24, resume=True)
    with pytest.raises(StoreError, match="different encoders"):
        encode(nih, out, fake_module.FakeEncoder(seed=1), limit=16, resume=True)
    result = encode(nih, out, fake_module.FakeEncoder(seed=1), limit=24, overwrite=True)
    assert result.rows == 24


def test_interrupted_encode_resumes_to_the_uninterrupted_vectors(nih, reference, tmp_path,
                                                                 fake_module, monkeypatch):
    out = tmp_path / "killed.h5"
    original = StoreWriter._write_chunk
    calls = {"n": 0}

    def dies_after_three_chunks(self, *args):
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        calls["n"] += 1
        original(self, *args)

    monkeypatch.setattr(StoreWriter, "_write_chunk", dies_after_three_chunks)
    first = fake_module.FakeEncoder()
    with pytest.raises(RuntimeError, match="simulated kill"):
        encode(nih, out, first)
    monkeypatch.setattr(StoreWriter, "_write_chunk", original)
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore.open(out)
    with EmbeddingStore.open(out, allow_incomplete=True) as store:
        assert len(store) == 48  # three chunks of 16
    second = fake_module.FakeEncoder()
    result = encode(nih, out, second, resume=True, batch_size=32)  # the first run's 8 is kept
    assert result.resumed_from == 48 and result.encoded == 72
    assert second.images_seen == 72  # finished rows were not redone
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.embeddings(normalized=False), reference["raw"])
        np.testing.assert_array_equal(store.head_logits(), reference["logits"])


def test_full_disk_leaves_a_resumable_store(nih, reference, tmp_path, fake_module,
                                            monkeypatch):
    out = tmp_path / "full.h5"
    real_setitem = h5py.Dataset.__setitem__
    writes = {"n": 0}

    def disk_fills(self, key, value):
        if self.name == "/embedding":
            writes["n"] += 1
            if writes["n"] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_fills)
    with pytest.raises(StoreError, match="No space left.*--resume"):
        encode(nih, out, fake_module.FakeEncoder())
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real_setitem)
    with EmbeddingStore.open(out, allow_incomplete=True) as store:
        assert len(store) == 48
    encode(nih, out, fake_module.FakeEncoder(), resume=True)
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.embeddings(normalized=False), reference["raw"])


@pytest.mark.slow
def test_sigkilled_encode_resumes_to_the_uninterrupted_vectors(nih, reference, tmp_path,
                                                               fake_module):
    out = tmp_path / "sigkill.h5"
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(fake_module.FOLDER)!r})
        from fake_encoder import FakeEncoder
        from cxrembed.data.nih import load_nih
        from cxrembed.encode import encode_dataset
        encode_dataset(load_nih({str(nih.root)!r}), {str(out)!r}, FakeEncoder(), batch_size=8,
                       chunk_rows=16, resume=True, progress=False, allow_other_data=True)
    ''')
    env = {**os.environ, "FAKE_KILL_AFTER_BATCHES": "7"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    with EmbeddingStore.open(out, allow_incomplete=True) as store:
        assert len(store) == 48  # 7 batches of 8 seen, 3 chunks of 16 committed
    env.pop("FAKE_KILL_AFTER_BATCHES")
    resumed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.embeddings(normalized=False), reference["raw"])


def test_image_only_encoder_stores_no_text(nih, tmp_path, fake_module):
    out = tmp_path / "vision.h5"
    encode(nih, out, fake_module.FakeEncoder(text=False, head=False), limit=16)
    with EmbeddingStore.open(out) as store:
        assert not store.has_text and not store.has_head and store.run is None
        with pytest.raises(StoreError, match="no text tower"):
            store.prompts


def test_tiny_clip_end_to_end(nih, tmp_path):
    from cxrembed.model import load_encoder

    encoder = load_encoder(model="cxr-tiny", pretrained="none")
    out = tmp_path / "tiny.h5"
    result = encode(nih, out, encoder, batch_size=32)
    assert result.rows == 120
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.image_id, nih.image_id)
        np.testing.assert_array_equal(store.labels, nih.labels)
        assert store.embed_dim == 512 and store.has_text and not store.has_head
        np.testing.assert_allclose(np.linalg.norm(store.embeddings(), axis=1), 1.0, atol=1e-6)
        rows = [0, 50, 119]
        np.testing.assert_allclose(store.embeddings(rows, normalized=False),
                                   direct_vectors(nih, encoder, rows), rtol=2e-3, atol=2e-3)
        text = store.text_embeddings(normalized=False)
        np.testing.assert_allclose(text["no finding"],
                                   encoder.encode_text(["no finding"]).numpy()[0], rtol=1e-5,
                                   atol=1e-6)
        assert store.fingerprint == json.loads(json.dumps(encoder.fingerprint))
        assert store.encoder().fingerprint == encoder.fingerprint  # reloads from the record
        assert len(store.prompts) == len(LABELS) + 1


def test_cli_encode_then_search(nih, tmp_path):
    from typer.testing import CliRunner

    from cxrembed.cli import app

    out = tmp_path / "cli.h5"
    runner = CliRunner()
    args = ["encode", str(nih.root), "--out", str(out), "--model", "cxr-tiny", "--pretrained",
            "none", "--split", "val", "--split", "test", "--batch-size", "16", "--no-progress",
            "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = int(np.isin(nih.split, ["val", "test"]).sum())
    assert summary["rows"] == summary["encoded"] == expected
    with EmbeddingStore.open(out) as store:
        assert set(store.split) == {"val", "test"}
    result = runner.invoke(app, args)  # exists: refused, the store untouched
    assert isinstance(result.exception, StoreError)
    first = nih.image_id[np.isin(nih.split, ["val", "test"])][0]
    result = runner.invoke(app, ["search", str(out), "--id", first, "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3


@pytest.mark.real_nih
@pytest.mark.slow
def test_real_nih_pngs_with_vit_b_32(shared_nih, tmp_path):
    """The 33 real 1024 px PNGs (3 of them RGBA) through ViT-B-32 with random weights."""
    from cxrembed.data.nih import load_nih
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder
    from cxrembed.search import search

    nih = load_nih(shared_nih / "sample", csv_path=shared_nih / "Data_Entry_2017_v2020.csv.gz",
                   train_val_list=shared_nih / "train_val_list.txt",
                   test_list=shared_nih / "test_list.txt", missing="drop")
    assert len(nih) == 33
    out = tmp_path / "real.h5"
    encode_dataset(nih, out, load_encoder(model="ViT-B-32", pretrained="none"), batch_size=16,
                   progress=False)
    with EmbeddingStore.open(out) as store:
        np.testing.assert_array_equal(store.image_id, nih.image_id)
        np.testing.assert_array_equal(store.labels, nih.labels)
        np.testing.assert_array_equal(store.patient_id, nih.patient_id)
        x = store.embeddings()
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
        hits = search(store, image_id=store.image_id[0], k=5, exclude_same_patient=True,
                      centre="off")
        allowed = store.patient_id != store.patient_id[0]
        sims = np.where(allowed, x @ x[0], -np.inf)
        assert [h.row for h in hits] == list(np.argsort(-sims, kind="stable")[:5])


def test_decode_bound_is_said_only_for_pngs_that_kept_the_model_waiting():
    from pathlib import Path
    from types import SimpleNamespace

    from cxrembed.encode.pipeline import EncodeResult, decode_bound
    from cxrembed.encode.runner import StageSeconds

    pngs, cached = SimpleNamespace(cache=None), SimpleNamespace(cache=object())
    assert decode_bound(pngs, StageSeconds(read=9.0, infer=1.0))  # cxr-tiny from PNGs
    assert not decode_bound(pngs, StageSeconds(read=1.0, infer=9.0))  # ViT-B-32 on a CPU
    assert not decode_bound(cached, StageSeconds(read=9.0, infer=1.0))  # nothing to cache
    assert EncodeResult(Path("s.h5"), None, 1, 1, 0, 1.0, 1.0).to_dict()["decode_bound"] is False


def test_encode_from_pngs_measures_its_wait_on_decoding_and_says_so(tmp_path, fake_module,
                                                                     caplog):
    """1024 px PNGs (as NIH's) and a model far cheaper than decoding them: the pipeline's
    own figures show it waited on the reader longer than the model ran, and encode says to
    build the pixel cache; from the cache it does not."""
    import logging

    from cxrembed.data.cache import build_pixel_cache
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin

    data = load_nih(make_twin(tmp_path / "nih", images=24, size=1024, seed=1, workers=0))
    with caplog.at_level(logging.INFO, logger="cxrembed.encode.pipeline"):
        from_pngs = encode(data, tmp_path / "png.h5", fake_module.FakeEncoder())
    stages = from_pngs.stage_seconds  # measured by the pipeline, not set by the test
    assert stages["read"] > stages["infer"] > 0
    assert from_pngs.decode_bound and from_pngs.to_dict()["decode_bound"] is True
    said = [r.getMessage() for r in caplog.records if "decode-bound" in r.getMessage()]
    assert len(said) == 1 and f"waited {stages['read']:.1f} s" in said[0]
    assert "cxrembed cache" in said[0]
    cache = build_pixel_cache(data, tmp_path / "pixels.h5", workers=0, progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxrembed.encode.pipeline"):
        from_cache = encode(data, tmp_path / "cached.h5", fake_module.FakeEncoder(),
                            pixel_cache=cache)
    assert not from_cache.decode_bound
    assert not any("decode-bound" in r.getMessage() for r in caplog.records)
