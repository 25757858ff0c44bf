"""The FAISS index beside a store: ``STORE.h5`` -> ``STORE.faiss`` (+ ``STORE.faiss.json``).

Kinds (inner product on unit vectors = cosine similarity; FAISS ids = store rows):

- ``flat`` (default): exact search, ``IndexFlatIP``.
- ``ivf``: ``IndexIVFFlat``, ``nlist`` ≈ 2·√N k-means cells, ``nprobe`` of them visited.
- ``hnsw``: an HNSW graph over float16 vectors (``IndexHNSWSQ``; ``M`` links per node,
  ``efSearch`` candidates per query).
- ``ivfpq`` / ``opq``: product-quantized IVF lists (72 bytes per 512-d vector), for stores
  past memory; searched with exact re-ranking from the store (:mod:`.compressed`).

Bytes per vector (512-d, default parameters; recorded in the sidecar as
``bytes_per_vector``): flat 2,048, ivf 2,056, hnsw ~1,160, ivfpq and opq 72.

Measured with ``benchmarks/bench_search.py`` on this project's 2-core CPU (synthetic
512-d vectors near a 16-d subspace, k=10; latency per query in batches of 1000 / one
query at a time; recall@10 against flat):

- 112,120 vectors: flat builds in 0.2 s, 0.63 / 17.6 ms; ivf 2.0 s, 0.81 / 1.4 ms,
  recall 0.981; hnsw 9.9 s, 0.21 / 0.46 ms, recall 0.998.
- 1,000,000 vectors: flat 1.3 s, 5.7 / 155 ms; ivf 25 s, 3.9 / 7.3 ms, recall 0.997;
  hnsw 186 s, 0.63 / 0.68 ms, recall 0.996.

So exact search is the right default at NIH size; the approximate kinds pay off for
single queries on stores far beyond it. The index is built on the GPU when faiss-gpu and
a GPU are present (flat and ivf), saved as a CPU index, and memory-mapped when loaded, so
opening it costs no RAM for the vectors. The ``.json`` sidecar records the kind, its
search parameters and the store's ``uuid``: an index of another store (or of an older
encode at the same path) is refused.

Centring (:mod:`cxrembed.store.centring`): an index holds the vectors as searched, so one
built with ``centre`` on (or ``auto`` on a store whose figure says so) holds centred,
re-normalised vectors; the sidecar says which (``centred``; sidecars written before it
read as not centred) and searches refuse to mix the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cxrembed.errors import ConfigError, StoreError
from cxrembed.store.compressed import PQ_KINDS, rerank, to_gpus
# Building lives in index_build, the files in index_files; this module, which loads and
# searches, re-exports both (the index's public names are all importable from here).
from cxrembed.store.index_build import (INDEX_KINDS, IndexBuilder, build_index, default_nlist,
                                        default_nprobe, default_params, extend_index)
from cxrembed.store.index_files import (IndexInfo, PreparedIndex, gpu_available, has_index,
                                        index_path, info_path, load_faiss)

__all__ = ["INDEX_KINDS", "IndexBuilder", "IndexInfo", "LoadedIndex", "PreparedIndex",
           "build_index", "default_nlist", "default_nprobe", "default_params", "extend_index",
           "gpu_available", "has_index", "index_path", "load_index", "search_index"]


@dataclass
class LoadedIndex:
    """A FAISS index and its sidecar facts."""

    index: Any
    info: IndexInfo
    #: optional object whose ``search(queries, k, allowed=, params=)`` answers as
    #: :func:`search_index` on ``index`` does, faster (``cxrembed serve``'s pruned flat scan)
    front: Any = None


def load_index(store: Any, *, mmap: bool = True, gpu: bool = False) -> LoadedIndex:
    """Load the index beside an open :class:`EmbeddingStore` (memory-mapped by default).

    Raises StoreError when there is none, or it belongs to another store or encode.
    """
    faiss = load_faiss()
    path = index_path(store.path)
    info_file = info_path(path)
    if not path.is_file() or not info_file.is_file():
        raise StoreError(f"no index beside store {store.path} (expected {path}); build one "
                         f"with `cxrembed index {store.path}`")
    try:
        info = IndexInfo(**json.loads(info_file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot read {info_file}: {exc}; rebuild it with "
                         f"`cxrembed index {store.path}`") from None
    if info.store_uuid != str(store.attrs.get("uuid", "")) or info.ntotal != len(store):
        raise StoreError(f"index {path} was built for another encode of this store; rebuild it "
                         f"with `cxrembed index {store.path}`")
    # Flat codes map with IO_FLAG_MMAP_IFC; IVF lists with IO_FLAG_MMAP (the two together
    # fail on IVF).
    flags = 0
    if mmap:
        ivf_lists = info.kind == "ivf" or info.kind in PQ_KINDS
        flags = faiss.IO_FLAG_MMAP if ivf_lists else faiss.IO_FLAG_MMAP_IFC
        flags |= faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise StoreError(f"index {path} is truncated or corrupt ({path.stat().st_size:,} "
                         f"bytes; FAISS: {reason[:160]}); rebuild it with "
                         f"`cxrembed index {store.path}`") from None
    if index.ntotal != len(store) or index.d != store.embed_dim:
        raise StoreError(f"index {path} holds {index.ntotal} × {index.d} vectors, the store "
                         f"{len(store)} × {store.embed_dim}; rebuild it")
    if gpu:
        if not gpu_available():
            raise ConfigError("gpu=True but faiss-gpu or a GPU is missing")
        index = (to_gpus(faiss, index) if info.kind in PQ_KINDS
                 else faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index))
    return LoadedIndex(index=index, info=info)


def search_index(index: Any, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
                 params: dict[str, Any] | None = None,
                 vectors: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of unit ``queries`` (q, D) among ``allowed`` rows.

    ``allowed`` is a boolean mask over the index's rows (None: all). With a ``rerank``
    parameter k' > 0 (the PQ kinds) and ``vectors`` (rows -> unit float32 vectors, e.g. the
    store's :meth:`~EmbeddingStore.embeddings_at`), the index finds max(k, k') candidates
    and the top ``k`` of them are re-scored exactly. Returns similarities and rows,
    ``(q, k)`` each; slots with no result hold row -1.
    """
    faiss = load_faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = params or {}
    kwargs: dict[str, Any] = {}
    if allowed is not None:
        bitmap = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        kwargs["sel"] = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
    if "nprobe" in params and _is_ivf(faiss, index):
        search_params = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]), **kwargs)
    elif "efSearch" in params and _is_hnsw(faiss, index):
        search_params = faiss.SearchParametersHNSW(efSearch=int(params["efSearch"]), **kwargs)
    elif kwargs:
        search_params = faiss.SearchParameters(**kwargs)
    else:
        search_params = None
    candidates = int(params.get("rerank") or 0) if vectors is not None else 0
    if candidates > 0:
        _, found = index.search(queries, min(max(k, candidates), index.ntotal),
                                params=search_params)
        return rerank(queries, found, k, vectors)
    sims, rows = index.search(queries, k, params=search_params)
    return sims, rows


def _is_ivf(faiss: Any, index: Any) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def _is_hnsw(faiss: Any, index: Any) -> bool:
    return isinstance(index, faiss.IndexHNSW)
