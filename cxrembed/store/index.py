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
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrembed.errors import ConfigError, StoreError
from cxrembed.store.compressed import (PQ_KINDS, bytes_per_vector, new_pq_index, pq_params,
                                       pq_training_size, rerank, to_gpus)
from cxrembed.files import disk_full_error, is_disk_full

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw") + PQ_KINDS
ADD_BLOCK = 65_536  # rows read from the store and added per step
TRAIN_PER_CELL = 50  # k-means training points per IVF cell (FAISS warns below 39)
KMEANS_ITERATIONS = 10  # FAISS's default is 25; cells barely move after 10
IVF_PROBE_SHARE = 16  # nprobe = nlist / 16 ...
IVF_MIN_PROBE = 64  # ... but at least 64 cells


@dataclass
class IndexInfo:
    """What the sidecar records about an index."""

    kind: str
    ntotal: int
    dim: int
    store_uuid: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # nlist, nprobe, M, efSearch ...
    centred: bool = False  # holds centred vectors (store mean subtracted, re-normalised)
    centre: str = "off"  # the --centre asked when it was built (auto | on | off)
    bytes_per_vector: float = 0.0  # index memory per vector (codes + ids); 0: not recorded


@dataclass
class LoadedIndex:
    """A FAISS index and its sidecar facts."""

    index: Any
    info: IndexInfo
    #: optional object whose ``search(queries, k, allowed=, params=)`` answers as
    #: :func:`search_index` on ``index`` does, faster (``cxrembed serve``'s pruned flat scan)
    front: Any = None


def index_path(store_path: str | os.PathLike) -> Path:
    """``STORE.h5`` -> ``STORE.faiss``."""
    return Path(store_path).with_suffix(".faiss")


def has_index(store_path: str | os.PathLike) -> bool:
    """An index file (or its sidecar) lies beside the store: searches must use it, or say
    why they cannot (a broken index is an error, never silently skipped)."""
    path = index_path(store_path)
    return path.exists() or _info_path(path).exists()


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - a declared dependency
        raise StoreError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12)"
                         ) from None
    return faiss


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except RuntimeError as exc:  # a broken CUDA setup means no GPU, not a crash
        log.warning("faiss-gpu is installed but cannot count GPUs (%s): building on the CPU",
                    exc)
        return False


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
        faiss = _faiss()
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
    faiss = _faiss()
    index, info = _build(store_path, kind, params, gpu, progress, centre)
    out = index_path(store_path)
    PreparedIndex(_write_tmp(faiss, index, info, out)).commit(out)
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


def _write_tmp(faiss: Any, index: Any, info: IndexInfo, out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    try:
        faiss.write_index(index, str(tmp))
        _info_path(tmp).write_text(json.dumps(asdict(info), indent=2))
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        _info_path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(out, exc, "the store itself is complete; `cxrembed index "
                                  "STORE` builds its index") from exc
        raise StoreError(f"cannot write index {out}: {exc}") from exc
    return tmp


@dataclass
class PreparedIndex:
    """An index written beside its final place, moved there by :meth:`commit`."""

    tmp: Path

    def commit(self, out: Path) -> None:
        # The sidecar first: an index file never sits beside a stale sidecar.
        os.replace(_info_path(self.tmp), _info_path(out))
        os.replace(self.tmp, out)


def extend_index(path: Path, store_path: str | os.PathLike, start: int) -> PreparedIndex:
    """The index at ``path`` (of the store's first ``start`` rows) plus rows ``start ..`` of
    ``store_path``, added without a rebuild (flat, IVF and HNSW all take new vectors; IVF
    keeps the cells it was trained on). Written beside ``path``; commit it to replace it."""
    from cxrembed.store.reader import EmbeddingStore

    faiss = _faiss()
    try:
        info = IndexInfo(**json.loads(_info_path(path).read_text()))
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
        return PreparedIndex(_write_tmp(faiss, index, info, path))
    with EmbeddingStore.open(store_path) as store:
        for block in range(start, len(store), ADD_BLOCK):
            stop = min(len(store), block + ADD_BLOCK)
            index.add(np.ascontiguousarray(store.embeddings(np.arange(block, stop)),
                                           dtype=np.float32))
        info.ntotal, info.store_uuid = int(index.ntotal), str(store.attrs.get("uuid", ""))
    log.info("%s index extended by %d vectors (now %d)", info.kind, info.ntotal - start,
             info.ntotal)
    return PreparedIndex(_write_tmp(faiss, index, info, path))


def _centres(store_path: str | os.PathLike, centre: str) -> bool:
    from cxrembed.store.centring import resolve_centring
    from cxrembed.store.reader import EmbeddingStore

    if centre == "off":
        return False
    with EmbeddingStore.open(store_path) as store:
        return resolve_centring(store, centre).centred


def load_index(store: Any, *, mmap: bool = True, gpu: bool = False) -> LoadedIndex:
    """Load the index beside an open :class:`EmbeddingStore` (memory-mapped by default).

    Raises StoreError when there is none, or it belongs to another store or encode.
    """
    faiss = _faiss()
    path = index_path(store.path)
    info_file = _info_path(path)
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
    faiss = _faiss()
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
