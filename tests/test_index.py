"""The ``index`` command, search-time nprobe / efSearch against a numpy brute force, and
an index file that is truncated."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_search import make_store
from typer.testing import CliRunner

from cxrembed.cli import app
from cxrembed.errors import ConfigError, StoreError
from cxrembed.search import search, search_vectors
from cxrembed.store import INDEX_KINDS, EmbeddingStore, build_index, index_path, load_index

K = 10


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ix") / "s.h5", n=3000)


def truth_and_queries(path):
    with EmbeddingStore.open(path) as store:
        x = store.embeddings()
    queries = x[::60]
    return queries, np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :K]


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def index_cli(*args):
    result = CliRunner().invoke(app, ["index", *map(str, args), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_command_builds_each_kind_with_its_parameters(store_path):
    assert INDEX_KINDS == ("flat", "ivf", "hnsw", "ivfpq", "opq")
    queries, truth = truth_and_queries(store_path)
    for kind, extra, params in (
            ("flat", [], {}),
            ("ivf", ["--nlist", 32, "--nprobe", 32], {"nlist": 32, "nprobe": 32}),
            ("hnsw", ["--hnsw-m", 8, "--ef-search", 200], {"M": 8, "efSearch": 200})):
        out = index_cli(store_path, "--kind", kind, *extra)
        assert out["kind"] == kind and out["index"] == str(index_path(store_path))
        with EmbeddingStore.open(store_path) as store:
            loaded = load_index(store)
            assert loaded.info.kind == kind and loaded.index.ntotal == 3000
            assert {k: loaded.info.params[k] for k in params} == params
            _, found = search_vectors(store, queries, K, index="index")
        # flat is exact; ivf visiting all 32 cells is exhaustive: the brute force's rows
        assert recall(found, truth) >= (0.97 if kind == "hnsw" else 1.0), kind


def test_index_command_refuses_bad_input(store_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(store_path), "--kind", "lsh"])
    assert isinstance(result.exception, ConfigError) and "flat, ivf, hnsw" in str(
        result.exception)
    result = runner.invoke(app, ["index", str(store_path), "--kind", "flat", "--nprobe", "4"])
    assert isinstance(result.exception, ConfigError) and "nprobe" in str(result.exception)
    result = runner.invoke(app, ["index", str(tmp_path / "absent.h5")])
    assert isinstance(result.exception, StoreError) and "does not exist" in str(
        result.exception)


def test_search_time_nprobe_trades_recall_for_cells_visited(store_path, tmp_path):
    path = make_store(tmp_path / "ivf.h5", n=3000)
    build_index(path, "ivf", params={"nlist": 64, "nprobe": 1})
    queries, truth = truth_and_queries(path)
    with EmbeddingStore.open(path) as store:
        figures = {}
        for nprobe in (1, 8, 64):
            _, found = search_vectors(store, queries, K, index="index",
                                      index_params={"nprobe": nprobe})
            figures[nprobe] = recall(found, truth)
        _, saved = search_vectors(store, queries, K, index="index")  # the saved nprobe=1
    assert figures[64] == 1.0  # every cell visited: exactly the brute force's rows
    assert figures[1] < figures[8] <= figures[64] and figures[1] < 0.95, figures
    assert recall(saved, truth) == figures[1]


def test_search_time_ef_search_reaches_the_brute_force(store_path, tmp_path):
    path = make_store(tmp_path / "hnsw.h5", n=3000)
    build_index(path, "hnsw", params={"M": 4, "efSearch": 10})
    queries, truth = truth_and_queries(path)
    with EmbeddingStore.open(path) as store:
        low = search_vectors(store, queries, K, index="index", index_params={"efSearch": 10})
        high = search_vectors(store, queries, K, index="index",
                              index_params={"efSearch": 1000})
    assert recall(high[1], truth) >= 0.99
    assert recall(low[1], truth) < recall(high[1], truth)
    with EmbeddingStore.open(path) as store:
        x = store.embeddings()
    np.testing.assert_allclose(high[0], np.take_along_axis(queries @ x.T, high[1], axis=1),
                               rtol=1e-3, atol=1e-3)  # the similarities are the cosines


def test_truncated_index_is_an_error_naming_the_file(tmp_path):
    path = make_store(tmp_path / "t.h5", n=600)
    build_index(path)
    faiss_file = index_path(path)
    faiss_file.write_bytes(faiss_file.read_bytes()[:5000])
    with EmbeddingStore.open(path) as store:
        with pytest.raises(StoreError, match=r"t\.faiss is truncated or corrupt.*cxrembed index"):
            search_vectors(store, store.embeddings([0]), K)  # auto: not silently exact
    assert search(path, image_id="00000001_000.png", k=3, index="exact")  # exact still works
    proc = subprocess.run([sys.executable, "-m", "cxrembed", "search", str(path), "--id",
                           "00000001_000.png"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "t.faiss is truncated or corrupt" in proc.stderr and "cxrembed index" in proc.stderr
