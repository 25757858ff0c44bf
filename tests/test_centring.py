"""Centred search: results equal a numpy brute force over centred, re-normalised vectors
(and over raw ones), for id, text and image queries; ``auto`` follows the figure the
store records; stores without a mean still search; the figure equals a numpy one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cxrembed.errors import ConfigError, StoreError
from cxrembed.labels import LABELS
from cxrembed.search import query_vector, search, search_vectors
from cxrembed.store import EmbeddingStore, StoreWriter, build_index, load_index
from cxrembed.store import centring as centring_mod
from cxrembed.store.centring import (MEAN_ATTR, RECORD_ATTR, measure_centring,
                                     resolve_centring, store_centring_attrs)

N, D = 900, 24
TEXT = {"Edema": (["a chest x-ray showing edema"], ["no edema"]),
        "No Finding": (["no finding"], [])}


def anisotropic(n: int, seed: int = 0):
    """Rows that all point one way (mean cosine ~0.97), with labelled clusters."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(1, n + 1), rng.integers(1, 5, n))[:n]
    cluster = rng.integers(0, 6, n)
    labels = np.zeros((n, len(LABELS)), np.uint8)
    labels[np.arange(n), cluster] = cluster > 1  # clusters 0, 1: No Finding
    common = 6.0 * rng.normal(size=D)
    vectors = common + rng.normal(size=(6, D))[cluster] + 0.7 * rng.normal(size=(n, D))
    return patients, labels, vectors.astype(np.float32)


def make_store(path, *, record: dict | None = None, mean: bool = True, seed: int = 0):
    patients, labels, vectors = anisotropic(N, seed)
    rng = np.random.default_rng(seed + 1)
    follow = np.zeros(N, np.int64)
    for i in range(1, N):
        follow[i] = follow[i - 1] + 1 if patients[i] == patients[i - 1] else 0
    ids = np.array([f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow)])
    rows = {"image_id": ids, "patient_id": patients.astype(np.int64), "follow_up": follow,
            "split": np.array(["train", "val", "test"])[patients % 3],
            "view": np.full(N, "PA"), "sex": np.full(N, "F"),
            "age": np.full(N, 50, np.float32), "labels": labels, "image_path": ids}
    text = np.asarray(vectors[:3] + rng.normal(size=(3, D)), np.float32)
    with StoreWriter.create(path, rows=rows, embed_dim=D, fingerprint={"model": "synthetic"},
                            has_head=False, has_text=True, batch_size=100, chunk_rows=300,
                            prompts=TEXT, text_embeddings=text,
                            attrs={"model_name": "synthetic"}) as writer:
        writer.append(vectors)
        attrs = {}
        if mean:
            attrs = store_centring_attrs(writer.read_unit_block, N, labels,
                                         np.ones_like(labels), patients)
            if record is not None:
                attrs[RECORD_ATTR] = {**attrs[RECORD_ATTR], **record}
        writer.finish(attrs)
    return path


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(x: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray, centred: bool):
    """numpy brute force; centring by the mean of the stored unit vectors, in float64."""
    x, query = x.astype(np.float64), query.astype(np.float64)
    if centred:
        mean = x.mean(axis=0)
        x, query = unit(x - mean), unit(query - mean)
    sims = np.where(allowed, x @ query, -np.inf)
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


def check(hits, expected):
    rows, sims = expected
    assert [h.row for h in hits] == list(rows)
    np.testing.assert_allclose([h.similarity for h in hits], sims, atol=2e-5)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("c") / "s.h5")


def test_id_and_text_queries_equal_numpy_centred_and_raw(store_path, tmp_path):
    with EmbeddingStore.open(store_path) as store:
        x = store.embeddings()
        text = store.text_embeddings()["no finding"]
        patient = store.patient_id
        for centre in ("on", "off"):
            build_index(store_path, centre=centre)
            assert load_index(store).info.centred is (centre == "on")
            for index in ("index", "exact"):
                for row in (0, 311, N - 1):
                    allowed = patient != patient[row]
                    hits = search(store, image_id=store.image_id[row], k=8, index=index,
                                  centre=centre, exclude_same_patient=True)
                    check(hits, reference(x, x[row], 8, allowed, centre == "on"))
                    assert hits.centring.centred is (centre == "on")
                hits = search(store, text="no finding", k=6, index=index, centre=centre)
                check(hits, reference(x, text, 6, np.ones(N, bool), centre == "on"))
    # the centred similarities spread out; the raw ones crowd near 1
    with EmbeddingStore.open(store_path) as store:
        raw = [h.similarity for h in search(store, image_id=store.image_id[5], k=10,
                                            centre="off", index="exact")]
        cen = [h.similarity for h in search(store, image_id=store.image_id[5], k=10,
                                            centre="on", index="exact")]
    assert min(raw) > 0.9 and max(cen) - min(cen) > 3 * (max(raw) - min(raw))


def test_auto_follows_the_recorded_figure(tmp_path, caplog):
    x_of = {}
    for centre in (True, False):
        path = make_store(tmp_path / f"{centre}.h5", record={"centre": centre,
                                                             "why": f"recorded {centre}"})
        build_index(path)  # auto, as encode builds it
        with EmbeddingStore.open(path) as store:
            x_of[centre] = x = store.embeddings()
            resolved = resolve_centring(store, "auto")
            assert resolved.centred is centre and resolved.reason == f"recorded {centre}"
            assert load_index(store).info.centred is centre
            auto = search(store, image_id=store.image_id[9], k=7, index="index")
            check(auto, reference(x, x[9], 7, np.arange(N) != 9, centre))
            assert auto.to_dict()["centring"]["figure"]["centre"] is centre
            # the other space: refused with --index index, scanned exactly with auto
            other = "off" if centre else "on"
            with pytest.raises(StoreError, match=f"--centre {'on' if centre else 'off'}"):
                search(store, image_id=store.image_id[9], k=7, index="index", centre=other)
            with caplog.at_level(logging.WARNING, logger="cxrembed.search"):
                hits = search(store, image_id=store.image_id[9], k=7, centre=other)
            assert "scanning the store exactly" in caplog.text
            check(hits, reference(x, x[9], 7, np.arange(N) != 9, not centre))
    np.testing.assert_array_equal(x_of[True], x_of[False])  # same vectors, two choices


def test_store_without_a_mean_still_searches(tmp_path, monkeypatch):
    path = make_store(tmp_path / "old.h5", mean=False)
    build_index(path)
    monkeypatch.setattr(centring_mod, "BLOCK", 128)
    with EmbeddingStore.open(path) as store:
        assert MEAN_ATTR not in store.attrs and RECORD_ATTR not in store.attrs
        x = store.embeddings()
        assert load_index(store).info.centred is False
        hits = search(store, image_id=store.image_id[3], k=5)  # auto: uncentred, as before
        assert hits.centring.centred is False
        check(hits, reference(x, x[3], 5, np.arange(N) != 3, False))
        asked = []
        read = store.embeddings
        monkeypatch.setattr(store, "embeddings", lambda rows=None, **kw: (
            asked.append(N if rows is None else len(rows)), read(rows, **kw))[1])
        on = resolve_centring(store, "on")  # the mean computed now, in blocks
        assert max(asked) <= 128
        np.testing.assert_allclose(on.mean, x.astype(np.float64).mean(axis=0), atol=1e-6)
        hits = search(store, image_id=store.image_id[3], k=5, centre=on, index="exact")
        check(hits, reference(x, x[3], 5, np.arange(N) != 3, True))
        with pytest.raises(ConfigError, match="--centre 'middle'"):
            search(store, image_id=store.image_id[3], centre="middle")


def test_a_tie_within_two_standard_errors_centres_a_clear_loss_does_not():
    """The rule on per-query figures built to be a tie and a clear loss."""
    from cxrembed.store.centring import _why

    assert "a tie within 2 standard errors: centred" in _why(0.5449, 0.5463, 0.0027, True, 2000)
    assert "not centred" in _why(0.4867, 0.5044, 0.0042, False, 2000)


@pytest.mark.parametrize("pool", [None, 150])
def test_the_figure_equals_a_numpy_brute_force(store_path, monkeypatch, pool):
    """finding-status precision@10, raw and centred, on every labelled row (N < sample);
    with ``pool``, neighbours among a seeded sample of whole spans of the store (as in a
    store of over NEIGHBOUR_POOL rows), reading those spans only."""
    monkeypatch.setattr(centring_mod, "BLOCK", 200)  # queries read across blocks
    monkeypatch.setattr(centring_mod, "SCORE_BLOCK", 128)  # top-k merged across blocks
    if pool is not None:
        monkeypatch.setattr(centring_mod, "NEIGHBOUR_POOL", pool)
    with EmbeddingStore.open(store_path) as store:
        x, labels, patients = store.embeddings(), store.labels, store.patient_id
        recorded = store.attrs[RECORD_ATTR]
    y = labels.astype(bool)
    if pool is None:
        cols = np.arange(N)
    else:  # whole 128-row spans of the store, seeded, about `pool` rows: 2 of the 8 spans
        spans = np.sort(np.random.default_rng(1).choice(8, 2, replace=False))
        cols = np.concatenate([np.arange(b * 128, min(N, (b + 1) * 128)) for b in spans])
    read_spans = []
    per_query = {}
    for name, v in (("raw", x.astype(np.float64)), ("centred", unit(x - x.mean(axis=0)))):
        sims = v @ v[cols].T
        sims[patients[:, None] == patients[None, cols]] = -np.inf
        top = cols[np.argsort(-sims, axis=1, kind="stable")[:, :10]]
        per_query[name] = np.array([np.mean([(y[i] & y[j]).any() if y[i].any()
                                             else not y[j].any() for j in top[i]])
                                    for i in range(N)])
    figures = {name: float(v.mean()) for name, v in per_query.items()}
    diff = per_query["centred"] - per_query["raw"]
    stderr = diff.std(ddof=1) / np.sqrt(N)
    got = measure_centring(lambda a, b: (read_spans.append((a, b)), x[a:b])[1], N, labels,
                           np.ones_like(labels), patients, x.mean(axis=0))
    assert got["queries"] == N and got["pool_rows"] == len(cols)
    assert max(b - a for a, b in read_spans) <= 128  # memory bounded by the block
    if pool is not None:  # the pool's spans and the queries' rows only, never the rest
        neighbour_reads = sum(b - a for a, b in read_spans) - N
        assert neighbour_reads == len(cols)
    assert got["raw"] == pytest.approx(figures["raw"], abs=1e-4)
    assert got["centred"] == pytest.approx(figures["centred"], abs=1e-4)
    assert got["stderr"] == pytest.approx(stderr, abs=1e-4)
    # centred unless worse than raw by more than two paired standard errors
    assert got["centre"] is bool(diff.mean() >= -2 * stderr)
    if pool is None:  # the store's own record: every row was a neighbour candidate
        assert recorded["raw"] == got["raw"] and recorded["centre"] is got["centre"]
    else:  # a smaller pool finds other neighbours
        assert (got["raw"], got["centred"]) != (recorded["raw"], recorded["centred"])


@pytest.mark.slow
def test_encode_records_the_mean_and_image_queries_follow_it(tmp_path):
    """A real encode records the mean and the figure, builds its index in the chosen
    space, and a new image query is centred with the same mean."""
    from typer.testing import CliRunner

    from cxrembed.cli import app
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    nih = load_nih(make_twin(tmp_path / "nih", images=40, size=64, seed=3, workers=0))
    out = tmp_path / "tiny.h5"
    result = encode_dataset(nih, out, load_encoder(model="cxr-tiny", pretrained="none"),
                            batch_size=20, progress=False)
    with EmbeddingStore.open(out) as store:
        x = store.embeddings()
        np.testing.assert_allclose(store.attrs[MEAN_ATTR], x.astype(np.float64).mean(axis=0),
                                   atol=1e-6)
        record = store.attrs[RECORD_ATTR]
        assert result.search_centring == record and record["queries"] == len(nih)
        assert load_index(store).info.centred is record["centre"]
        query = query_vector(store, image=nih.path[7])
        for centre in ("on", "off"):
            hits = search(store, image=nih.path[7], k=5, centre=centre, index="exact",
                          exclude_same_patient=True)
            allowed = store.patient_id != store.patient_id[7]
            check(hits, reference(x, query.vector, 5, allowed, centre == "on"))
    done = CliRunner().invoke(app, ["search", str(out), "--id", str(nih.image_id[0]), "-k",
                                    "3", "--json"])
    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert body["centring"]["centred"] is record["centre"]
    assert body["centring"]["figure"] == record


def test_report_search_section_says_how_similarity_was_measured():
    from cxrembed.report.sections import search_section

    record = {"raw": 0.553, "centred": 0.5604, "centre": True}
    search = {"title": "t", "query": {"image_id": "q.png", "labels": ["Edema"]},
              "neighbours": [{"image_id": "n.png", "similarity": 0.4213, "labels": [],
                              "patient_id": 4}],
              "centring": {"centred": True, "choice": "auto", "figure": record,
                           "reason": "finding-status precision@10 centred 0.5604 >= raw 0.5530"}}
    html = search_section([search], {})
    assert "cosine of centred vectors" in html and "centred 0.5604 &gt;= raw 0.5530" in html
    assert "sim 0.4213" in html
    old = search_section([{**search, "centring": None}], {})  # a demo folder from before
    assert "sim 0.4213" in old and "centred vectors" not in old


def test_a_centred_index_is_rebuilt_when_rows_are_appended(tmp_path):
    """`encode --append` extends an index; a centred one is rebuilt with the new store's
    mean (vectors centred by the old mean would not be the ones queries meet)."""
    from cxrembed.store import extend_index, index_path

    old = make_store(tmp_path / "old.h5")
    build_index(old, centre="on")
    grown = make_store(tmp_path / "grown.h5", seed=5)  # stands in for the appended store
    extend_index(index_path(old), grown, N).commit(index_path(grown))
    with EmbeddingStore.open(grown) as store:
        loaded = load_index(store)
        assert loaded.info.centred and loaded.info.centre == "on"
        x = store.embeddings().astype(np.float64)
        expected = unit(x - x.mean(axis=0))
        np.testing.assert_allclose(loaded.index.reconstruct_n(0, N), expected, atol=1e-5)
