"""Building an index of a store's vectors (see :mod:`cxrembed.store.index` for the kinds):
each kind's default parameters, :class:`IndexBuilder` (train on a sample, add in
blocks), :func:`build_index` and :func:`extend_index` (new rows without a rebuild)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, StoreError
from cxrembed.store.compressed import (PQ_KINDS, bytes_per_vector, new_pq_index, pq_params,
                                       pq_training_size, to_gpus)
from cxrembed.store.index_files import (IndexInfo, PreparedIndex, gpu_available, index_path,
                                        info_path, load_faiss, write_tmp)

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw") + PQ_KINDS
ADD_BLOCK = 65_536  # rows read from the store and added per step
TRAIN_PER_CELL = 50  # k-means training points per IVF cell (FAISS warns below 39)
KMEANS_ITERATIONS = 10  # FAISS's default is 25; cells barely move after 10
IVF_PROBE_SHARE = 16  # nprobe = nlist / 16 ...
IVF_MIN_PROBE = 64  # ... but at least 64 cells


def default_nlist(n: int) -> int:
    """About 2·√N cells (670 at NIH size, 2,000 at 1M), at least 39 points per cell
    (FAISS's floor). Fewer, larger cells than the usual 4·√N keep k-means training and
    assignment to a couple of minutes at 1M vectors on a 2-core CPU."""
    return int(max(1, min(round(2 * math.sqrt(n)), n // 39)))


def default_nprobe(nlist: int) -> int:
    """A 16th of the cells, at least 64 (recall@10 ~0.98 at 112k and ~0.997 at 1M
    synthetic vectors in ``benchmarks/bench_search.py``)."""
    return int(min(nlist, max(IVF_MIN_PROBE, round(nlist / IVF_PROBE_SHARE))))


def default_params(kind: str, n: int, dim: int = 512) -> dict[str, Any]:
    """Build/search parameters of each kind (chosen with ``benchmarks/bench_search.py``)."""
    if kind in PQ_KINDS:
        return pq_params(n, dim, default_nlist(n))
    if kind == "flat":
        return {}
    if kind == "ivf":
        nlist = default_nlist(n)
        return {"nlist": nlist, "nprobe": default_nprobe(nlist)}
    if kind == "hnsw":
        return {"M": 16, "efConstruction": 40, "efSearch": 128}
    raise ConfigError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")


class IndexBuilder:
    """Train on a sample, add in blocks, return a CPU index (ids = the order added).

    :func:`build_index` streams a store through it; benchmarks feed it arrays.
    ``gpu=None`` builds on a GPU when faiss-gpu sees one (flat and ivf).
    """

    def __init__(self, kind: str, dim: int, n: int, params: dict[str, Any] | None,
                 gpu: bool | None, seed: int) -> None:
        faiss = load_faiss()
        self.faiss, self.kind, self.seed = faiss, kind, seed
        defaults = default_params(kind, n, dim)
        self.params = {**defaults, **(params or {})}
        if kind == "ivf" and "nprobe" not in (params or {}):  # follow a given nlist
            self.params["nprobe"] = default_nprobe(int(self.params["nlist"]))
        unknown = set(self.params) - set(defaults)
        if unknown:
            raise ConfigError(f"unknown {kind} index parameter(s) {', '.join(sorted(unknown))}; "
                              f"expected {', '.join(defaults) or 'none'}")
        use_gpu = gpu_available() if gpu is None else gpu
        if use_gpu and not gpu_available():
            raise ConfigError("gpu=True but faiss-gpu or a GPU is missing: pip install "
                              "faiss-gpu-cu12, or build on the CPU")
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind in PQ_KINDS:
            index = new_pq_index(faiss, kind, dim, n, self.params, seed, KMEANS_ITERATIONS)
        elif kind == "ivf":
            if self.params["nlist"] > n:
                raise ConfigError(f"nlist {self.params['nlist']} exceeds the {n} vectors")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(self.params["nlist"]),
                                       metric)
            index.nprobe = int(self.params["nprobe"])
            index.cp.niter = KMEANS_ITERATIONS
            index.cp.seed = seed
        else:
            # float16 storage: the store's vectors are float16 already, so nothing is lost,
            # and half the bytes per distance builds the graph ~1.6x faster.
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, int(self.params["M"]),
                                      metric)
            index.hnsw.efConstruction = int(self.params["efConstruction"])
            index.hnsw.efSearch = int(self.params["efSearch"])
            use_gpu = False  # HNSW has no GPU build in FAISS
        self.gpu_res = None
        if use_gpu and kind in PQ_KINDS:  # every GPU, sharded (never run: no GPU here)
            index, use_gpu = to_gpus(faiss, index), False
            self.on_gpus = True
        if use_gpu:
            self.gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.gpu_res, 0, index)
            log.info("building the %s index on the GPU", kind)
        self.index = index

    on_gpus = False  # a PQ index spread over every GPU by :func:`to_gpus`

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf" or self.kind in PQ_KINDS

    def training_size(self, n: int) -> int:
        """Up to 50 points per cell (ivf); at least 64 per PQ centroid (PQ kinds)."""
        if self.kind in PQ_KINDS:
            return pq_training_size(n, self.params, TRAIN_PER_CELL)
        return min(n, TRAIN_PER_CELL * int(self.params.get("nlist", 1)))

    def training_rows(self, n: int) -> np.ndarray:
        """Rows to train on (:meth:`training_size` of them), drawn with a fixed seed."""
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(n, size=self.training_size(n), replace=False))

    def train(self, sample: np.ndarray) -> None:
        if self.needs_training:
            if len(sample) > self.training_size(len(sample)):
                sample = sample[self.training_rows(len(sample))]
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, block: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(block, dtype=np.float32))

    def finish(self) -> Any:
        if self.gpu_res is not None or self.on_gpus:
            return self.faiss.index_gpu_to_cpu(self.index)
        return self.index


def build_index(store_path: str | os.PathLike, kind: str = "flat", *,
                params: dict[str, Any] | None = None, gpu: bool | None = None,
                progress: bool = False, centre: str = "auto") -> Path:
    """Build the index of a complete store and save it beside it; returns its path.

    Vectors are read from the store in blocks (a seeded sample first, to train ivf and the
    PQ kinds); the index itself is held in memory while it is built (N × D float32 for
    flat and ivf, ``bytes_per_vector`` × N for the PQ kinds). ``centre``: auto | on | off, see
    :func:`cxrembed.store.centring.resolve_centring`.
    """
    faiss = load_faiss()
    index, info = _build(store_path, kind, params, gpu, progress, centre)
    out = index_path(store_path)
    PreparedIndex(write_tmp(faiss, index, info, out)).commit(out)
    log.info("%s index of %d vectors at %s%s", kind, info.ntotal, out,
             " (centred)" if info.centred else "")
    return out


def _build(store_path: str | os.PathLike, kind: str, params: dict[str, Any] | None,
           gpu: bool | None, progress: bool, centre: str) -> tuple[Any, IndexInfo]:
    from cxrembed.progress import progress_bar
    from cxrembed.store.centring import resolve_centring
    from cxrembed.store.reader import EmbeddingStore

    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    with EmbeddingStore.open(store_path) as store:
        n = len(store)
        if n == 0:
            raise StoreError(f"store {store_path} has no rows to index")
        centring = resolve_centring(store, centre)
        builder = IndexBuilder(kind, store.embed_dim, n, params, gpu, seed=1234)
        if builder.needs_training:
            builder.train(centring.apply(store.embeddings(builder.training_rows(n))))
        with progress_bar(n, f"indexing ({kind})", enabled=progress, unit="vec") as advance:
            for start in range(0, n, ADD_BLOCK):
                stop = min(n, start + ADD_BLOCK)
                builder.add(centring.apply(store.embeddings(np.arange(start, stop))))
                advance(stop - start)
        index = builder.finish()
        info = IndexInfo(kind=kind, ntotal=int(index.ntotal), dim=store.embed_dim,
                         store_uuid=str(store.attrs.get("uuid", "")), params=builder.params,
                         centred=centring.centred, centre=centring.choice,
                         bytes_per_vector=bytes_per_vector(kind, store.embed_dim,
                                                           builder.params))
    return index, info


def extend_index(path: Path, store_path: str | os.PathLike, start: int) -> PreparedIndex:
    """The index at ``path`` (of the store's first ``start`` rows) plus rows ``start ..`` of
    ``store_path``, added without a rebuild (flat, IVF and HNSW all take new vectors; IVF
    keeps the cells it was trained on). Written beside ``path``; commit it to replace it."""
    from cxrembed.store.reader import EmbeddingStore

    faiss = load_faiss()
    try:
        info = IndexInfo(**json.loads(info_path(path).read_text()))
        index = faiss.read_index(str(path))
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot read index {path} to extend it: {exc}; rebuild it with "
                         "`cxrembed index`") from None
    if index.ntotal != start:
        raise StoreError(f"index {path} holds {index.ntotal} vectors, not the store's "
                         f"{start}: rebuild it with `cxrembed index`")
    if info.centred or _centres(store_path, info.centre):
        # New rows move the store's mean (and may change the auto choice): vectors centred
        # by the old mean are not those the new store's queries meet, so it is rebuilt.
        log.info("%s index of centred vectors: rebuilt for the new rows", info.kind)
        index, info = _build(store_path, info.kind, info.params, None, False, info.centre)
        return PreparedIndex(write_tmp(faiss, index, info, path))
    with EmbeddingStore.open(store_path) as store:
        for block in range(start, len(store), ADD_BLOCK):
            stop = min(len(store), block + ADD_BLOCK)
            index.add(np.ascontiguousarray(store.embeddings(np.arange(block, stop)),
                                           dtype=np.float32))
        info.ntotal, info.store_uuid = int(index.ntotal), str(store.attrs.get("uuid", ""))
    log.info("%s index extended by %d vectors (now %d)", info.kind, info.ntotal - start,
             info.ntotal)
    return PreparedIndex(write_tmp(faiss, index, info, path))


def _centres(store_path: str | os.PathLike, centre: str) -> bool:
    from cxrembed.store.centring import resolve_centring
    from cxrembed.store.reader import EmbeddingStore

    if centre == "off":
        return False
    with EmbeddingStore.open(store_path) as store:
        return resolve_centring(store, centre).centred
