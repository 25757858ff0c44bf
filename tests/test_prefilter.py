"""serve's pruned flat scan: the same hits and similarities as FAISS's full scan, bit for
bit, with and without filters; it falls back to the full scan when the bound prunes little."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cxrembed.serve.prefilter import BoundedFlat
from cxrembed.store import search_index


def flat(vectors: np.ndarray):
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def low_rank():
    """Unit vectors near a 12-d subspace of 96-d, as embeddings of one domain are."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 12)) @ rng.normal(size=(12, 96)) + 0.6 * rng.normal(size=(6000, 96))
    return unit(x + 3 * rng.normal(size=96))  # plus a common direction (anisotropic)


def test_pruned_scan_equals_the_full_scan_bit_for_bit(low_rank):
    index = flat(low_rank)
    front = BoundedFlat(index, rank=16)
    rng = np.random.default_rng(1)
    queries = np.concatenate([low_rank[rng.integers(0, 6000, 20)],
                              unit(rng.normal(size=(5, 96)))])  # far from the data too
    split = rng.integers(0, 3, 6000) == 0
    for k in (1, 10, 50):
        for allowed in (None, split, np.arange(6000) != 7):
            want = search_index(index, queries, k, allowed=allowed)
            got = front.search(queries, k, allowed=allowed)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    assert front.pruned > 0.8 * (front.pruned + front.scanned)  # it did prune
    keep = front.candidates(queries[0], 10, None)
    assert keep is not None and keep.sum() < 600  # under a tenth of the rows scored


def test_spread_vectors_fall_back_to_the_full_scan():
    x = unit(np.random.default_rng(2).normal(size=(3000, 64)))  # no low-rank structure
    index = flat(x)
    front = BoundedFlat(index, rank=8)
    want = search_index(index, x[:5], 10)
    got = front.search(x[:5], 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert front.scanned == 5 and front.pruned == 0
    few = np.zeros(3000, bool)
    few[:4] = True  # fewer allowed rows than k: the full scan pads with -1 as FAISS does
    np.testing.assert_array_equal(front.search(x[:1], 10, allowed=few)[1],
                                  search_index(index, x[:1], 10, allowed=few)[1])


def test_rows_found_only_through_their_residual_are_kept():
    """Rows whose score comes mostly from outside the kept directions (residual aligned
    with the query's) are in the top 10: the bound must keep them (halving it loses them)."""
    rng = np.random.default_rng(3)
    bulk = np.zeros((3000, 16))
    bulk[:, :4] = rng.normal(size=(3000, 4))  # the principal directions
    bulk[:, 4:] = 0.05 * rng.normal(size=(3000, 12))
    u = unit(rng.normal(size=(1, 4)))[0]
    traps = np.zeros((5, 16))
    traps[:, :4] = 0.3 * u + 0.01 * rng.normal(size=(5, 4))
    traps[:, 10] = 0.954  # almost all of their score is residual
    x = unit(np.concatenate([bulk, traps]))
    query = np.zeros((1, 16))
    query[0, :4], query[0, 10] = u, 1.0
    query = unit(query)
    index = flat(x)
    front = BoundedFlat(index, rank=4)
    want = search_index(index, query, 10)
    assert set(range(3000, 3005)) <= set(want[1][0])  # the traps are neighbours
    got = front.search(query, 10)
    assert front.pruned == 1
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_known_queries_outside_the_image_directions_are_pruned_too(low_rank):
    """Text prompts sit apart from the images (CLIP's modality gap): unknown, such a query
    falls back to the full scan; given in advance, its bound is tight. Same hits both ways."""
    rng = np.random.default_rng(4)
    texts = unit(rng.normal(size=(6, 96)))  # far from the images' 12-d subspace
    index = flat(low_rank)
    plain = BoundedFlat(index, rank=16)
    knowing = BoundedFlat(index, rank=16, known_queries=texts)
    assert plain.candidates(texts[0], 10, None) is None
    keep = knowing.candidates(texts[0], 10, None)
    assert keep is not None and keep.sum() < 300
    want = search_index(index, texts, 10)
    for front in (plain, knowing):
        got = front.search(texts, 10)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert knowing.pruned == 6 and plain.scanned == 6


def test_the_server_answers_through_the_pruned_scan(tmp_path):
    """StoreService with the pruned scan in front: the same JSON as `search` without it."""
    from test_centring import make_store

    from cxrembed.search import search
    from cxrembed.serve.prefilter import bounded
    from cxrembed.serve.service import StoreService
    from cxrembed.store import build_index

    path = make_store(tmp_path / "s.h5")
    build_index(path)
    service = StoreService(path)
    try:
        assert service.loaded_index.front is None  # small stores: the full scan
        prompts = service.centring.apply(np.stack(list(service.store.text_embeddings().values())))
        front = bounded(service.loaded_index.index, min_rows=0, known_queries=prompts)
        service.loaded_index.front = front
        image_id = str(service.store.image_id[40])
        for ask, cli in (({"image_id": image_id, "exclude_same_patient": True},
                          {"image_id": image_id, "exclude_same_patient": True}),
                         ({"text": "no finding", "split": "test"},
                          {"text": "no finding", "split": "test"})):
            served = service.search(k=9, **ask)
            assert served == search(path, k=9, **cli).to_dict()
        assert front.pruned == 2
    finally:
        service.close()
