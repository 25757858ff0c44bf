"""The compressed index kinds (ivfpq, opq): re-ranked results against a numpy brute force,
recall against exact search, the memory per vector, chunked building, bad parameters, and
the multi-GPU sharding call (through a stand-in faiss: no GPU here)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import faiss
import numpy as np
import pytest
from test_search import make_store
from typer.testing import CliRunner

from cxrembed.cli import app
from cxrembed.errors import ConfigError
from cxrembed.search import search_vectors
from cxrembed.store import EmbeddingStore, build_index, load_index
from cxrembed.store import compressed
from cxrembed.store import index_build
from cxrembed.store.compressed import rerank, to_gpus

K, N = 10, 2000
# Small codes so that 2,000 rows train them (FAISS wants 39 points per PQ centroid).
PARAMS = {"nlist": 16, "nprobe": 4, "M": 8, "nbits": 4, "rerank": 60}
RECALL_FLOOR = 0.9  # recall@10 of the re-ranked search at these settings (measured 0.96-0.99)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    # FAISS's OpenMP threads spin while they wait: on a loaded 2-core machine, PQ training
    # with 2 threads takes 4-8x the wall time of 1.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One store per kind (the index lies beside its store), with exact vectors."""
    out = {}
    for kind in ("ivfpq", "opq"):
        path = make_store(tmp_path_factory.mktemp(kind) / "s.h5", n=N)
        build_index(path, kind, params=PARAMS)
        out[kind] = path
    with EmbeddingStore.open(out["ivfpq"]) as store:
        vectors = store.embeddings()
    return out, vectors


def brute_force_over(candidates, queries, vectors, k):
    """Exact top-k among each query's candidate rows (numpy only)."""
    rows = []
    for query, mine in zip(queries, candidates):
        mine = mine[mine >= 0]
        sims = vectors[mine] @ query
        rows.append(mine[np.argsort(-sims, kind="stable")[:k]])
    return np.array(rows)


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


@pytest.mark.parametrize("kind", ["ivfpq", "opq"])
def test_reranked_search_is_the_brute_force_over_its_candidates(built, kind):
    paths, vectors = built
    queries = vectors[::40]
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :K]
    with EmbeddingStore.open(paths[kind]) as store:
        loaded = load_index(store)
        assert loaded.info.kind == kind and loaded.info.params == PARAMS
        assert loaded.info.bytes_per_vector == 8 * 4 / 8 + 8  # 4 bytes of codes + the id
        sims, rows = search_vectors(store, queries, K, index="index")
        _, plain = search_vectors(store, queries, K, index="index", index_params={"rerank": 0})
        # the candidates the index itself finds (PQ scores), as search_vectors asked for them
        _, candidates = loaded.index.search(queries, PARAMS["rerank"])
    np.testing.assert_array_equal(rows, brute_force_over(candidates, queries, vectors, K))
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ vectors.T, rows, axis=1),
                               rtol=1e-5, atol=1e-5)  # exact cosines, not PQ estimates
    assert recall(rows, truth) >= RECALL_FLOOR
    assert recall(plain, truth) < recall(rows, truth)  # PQ scores alone rank worse


def test_reranked_search_keeps_the_split_filter(built):
    paths, vectors = built
    with EmbeddingStore.open(paths["opq"]) as store:
        test_rows = np.flatnonzero(store.split == "test")
        queries = vectors[test_rows[:20]]
        _, rows = search_vectors(store, queries, K, split="test", index="index")
        _, exact = search_vectors(store, queries, K, split="test", index="exact")
    assert np.isin(rows, test_rows).all()
    assert recall(rows, exact) >= RECALL_FLOOR


def test_rerank_returns_fewer_when_fewer_candidates():
    queries = np.eye(3, dtype=np.float32)
    stored = np.eye(3, dtype=np.float32)[[2, 0, 1]]  # row r holds axis (r + 2) % 3
    candidates = np.array([[0, 1, -1], [2, -1, -1], [-1, -1, -1]])
    sims, rows = rerank(queries, candidates, 2, lambda r: stored[r])
    np.testing.assert_array_equal(rows, [[1, 0], [2, -1], [-1, -1]])
    np.testing.assert_array_equal(sims, [[1, 0], [1, -np.inf], [-np.inf, -np.inf]])


def test_build_trains_on_a_seeded_sample_and_adds_in_blocks(tmp_path, monkeypatch):
    path = make_store(tmp_path / "s.h5", n=N)
    requests = []
    original = EmbeddingStore.embeddings

    def spy(self, rows=None, normalized=True):
        requests.append(None if rows is None else np.asarray(rows).copy())
        return original(self, rows, normalized)

    monkeypatch.setattr(EmbeddingStore, "embeddings", spy)
    monkeypatch.setattr(index_build, "ADD_BLOCK", 300)
    monkeypatch.setattr(compressed, "PQ_TRAIN_MIN", 500)  # a sample smaller than the store
    params = {**PARAMS, "nlist": 8}
    build_index(path, "ivfpq", params=params)
    first = requests[0]
    build_index(path, "ivfpq", params=params)
    assert all(r is not None for r in requests)  # never the whole store at once
    assert len(first) == 64 * 2 ** 4  # 64 points per PQ centroid, of 2,000 rows
    assert np.array_equal(first, requests[len(requests) // 2])  # the same seeded sample
    blocks = requests[1:len(requests) // 2]
    assert max(len(b) for b in blocks) == 300
    assert np.array_equal(np.concatenate(blocks), np.arange(N))  # every row, in order


def test_embeddings_at_reads_scattered_rows_like_embeddings(built):
    paths, vectors = built
    rows = np.array([1999, 3, 3, 1000, 0])
    with EmbeddingStore.open(paths["ivfpq"]) as store:
        np.testing.assert_array_equal(store.embeddings_at(rows), store.embeddings(rows))
        with pytest.raises(ConfigError, match="row 2000 is out of range"):
            store.embeddings_at([2000])


def test_index_command_reports_bytes_per_vector_and_refuses_bad_pq_options(built, tmp_path):
    path = make_store(tmp_path / "c.h5", n=N)
    result = CliRunner().invoke(app, [
        "index", str(path), "--kind", "ivfpq", "--nlist", "8", "--pq-m", "4", "--pq-bits",
        "4", "--rerank", "30", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["bytes_per_vector"] == 4 * 4 / 8 + 8 and out["params"]["rerank"] == 30
    result = CliRunner().invoke(app, ["index", str(path), "--kind", "opq"])  # 8-bit codes
    assert isinstance(result.exception, ConfigError) and "needs at least 9,984 vectors" in str(
        result.exception) and "--kind flat" in str(result.exception)
    result = CliRunner().invoke(app, ["index", str(path), "--kind", "opq", "--hnsw-m", "8"])
    assert isinstance(result.exception, ConfigError) and "--pq-m" in str(result.exception)
    proc = subprocess.run([sys.executable, "-m", "cxrembed", "index", str(path), "--kind",
                           "ivfpq", "--pq-m", "5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "--pq-m 5" in proc.stderr and "divide the 32-d vectors" in proc.stderr


def test_sharding_over_every_gpu_uses_faiss_public_cloner():
    calls = {}

    class Options:
        shard = False
        useFloat16 = False

    def to_all(index, co=None, ngpu=-1):
        calls.update(index=index, shard=co.shard, float16=co.useFloat16, ngpu=ngpu)
        return "sharded"

    fake = types.SimpleNamespace(get_num_gpus=lambda: 4, GpuMultipleClonerOptions=Options,
                                 index_cpu_to_all_gpus=to_all)
    assert to_gpus(fake, "cpu index") == "sharded"
    assert calls == {"index": "cpu index", "shard": True, "float16": True, "ngpu": 4}
    with pytest.raises(ConfigError, match="no GPU"):
        to_gpus(types.SimpleNamespace(get_num_gpus=lambda: 0), "cpu index")


def test_centred_pq_index_reranks_in_the_centred_space(tmp_path):
    from cxrembed.store.centring import resolve_centring

    path = make_store(tmp_path / "c.h5", n=N)
    build_index(path, "ivfpq", params=PARAMS, centre="on")
    with EmbeddingStore.open(path) as store:
        centring = resolve_centring(store, "on")
        vectors = centring.apply(store.embeddings())
        queries = vectors[::100]
        loaded = load_index(store)
        assert loaded.info.centred
        sims, rows = search_vectors(store, store.embeddings()[::100], K, index="index",
                                    centre="on")
        _, candidates = loaded.index.search(queries, PARAMS["rerank"])
    np.testing.assert_array_equal(rows, brute_force_over(candidates, queries, vectors, K))
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ vectors.T, rows, axis=1),
                               rtol=1e-5, atol=1e-5)
