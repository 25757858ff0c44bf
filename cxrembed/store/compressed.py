"""Compressed FAISS index kinds for stores past memory (10M+ vectors), and re-ranking.

- ``ivfpq``: ``IVF{nlist},PQ{M}x{nbits}`` (inner product): each vector kept as ``M``
  codes of ``nbits`` bits (64 bytes at the default M=64, 8 bits) plus its 8-byte id in
  its inverted list: 72 bytes per vector against 1,024 for the store's float16 row and
  2,048 for ``flat``'s float32 (10M vectors: 0.72 GB, 10.2 GB, 20.5 GB).
- ``opq``: the same after a learned ``OPQ{M}`` rotation (``OPQ{M},IVF{nlist},PQ{M}x{nbits}``),
  which spreads the variance evenly over the ``M`` sub-vectors; same bytes per vector plus
  one D×D float32 matrix (1 MiB at D=512).

Both are trained on a seeded sample of the store (at least ``PQ_TRAIN_MIN`` rows: FAISS
wants 39 points per PQ centroid) and filled in blocks read from it. PQ distances are
approximate, so a search asks the index for ``rerank`` candidates (k' ≥ k) and re-scores
them exactly from the store's float16 vectors (:func:`rerank`), reading only those rows:
the top k then equal a brute-force search over the candidates found.

On a machine where faiss-gpu sees GPUs, :func:`to_gpus` spreads an index over all of them
with FAISS's own sharding (``index_cpu_to_all_gpus`` with ``shard=True``: each GPU holds
1/n of the lists). That path uses FAISS's public API only and is guarded by
``gpu_available``; it has never run on this project's machines (no GPU was lent).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)

PQ_KINDS = ("ivfpq", "opq")
PQ_TRAIN_MIN = 64 * 256  # 64 points per PQ centroid (FAISS warns below 39 x 256)
PQ_MAX_NLIST = 4096  # k-means on 205k points and assigning 10M vectors fit ~10 min on 2 cores
DEFAULT_RERANK = 100  # candidates re-scored exactly per query (k')
ID_BYTES = 8  # an IVF list stores each vector's int64 id beside its code


def default_sub_quantizers(dim: int) -> int:
    """M: 8 dimensions per sub-quantizer (64 for ViT-B/32's 512), a divisor of ``dim``."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def pq_params(n: int, dim: int, nlist: int) -> dict[str, Any]:
    """Defaults of the PQ kinds for ``n`` vectors (``nlist``: the ``ivf`` kind's ~2·√N)."""
    nlist = min(nlist, PQ_MAX_NLIST)
    return {"nlist": nlist, "nprobe": min(nlist, max(16, round(nlist / 16))),
            "M": default_sub_quantizers(dim), "nbits": 8, "rerank": DEFAULT_RERANK}


def bytes_per_vector(kind: str, dim: int, params: dict[str, Any]) -> float:
    """Memory an index holds per vector (codes + ids; the quantizers' fixed cost aside)."""
    if kind == "flat":
        return 4.0 * dim
    if kind == "ivf":
        return 4.0 * dim + ID_BYTES
    if kind == "hnsw":  # float16 codes + ~2·M int32 links on layer 0 (upper layers ~1/M more)
        return 2.0 * dim + 2 * 4 * int(params.get("M", 16)) * (1 + 1 / int(params.get("M", 16)))
    if kind in PQ_KINDS:
        return math.ceil(int(params["M"]) * int(params["nbits"]) / 8) + ID_BYTES
    raise ConfigError(f"unknown index kind {kind!r}")


def factory_string(kind: str, params: dict[str, Any]) -> str:
    """The ``faiss.index_factory`` description of a PQ kind."""
    m, nbits, nlist = int(params["M"]), int(params["nbits"]), int(params["nlist"])
    pq = f"IVF{nlist},PQ{m}x{nbits}"
    return f"OPQ{m},{pq}" if kind == "opq" else pq


def new_pq_index(faiss: Any, kind: str, dim: int, n: int, params: dict[str, Any],
                 seed: int, kmeans_iterations: int) -> Any:
    """An untrained IVF-PQ (or OPQ + IVF-PQ) index for inner product, checked first."""
    m, nbits, nlist = int(params["M"]), int(params["nbits"]), int(params["nlist"])
    if m < 1 or dim % m:
        raise ConfigError(f"--pq-m {m}: the number of sub-quantizers must divide the "
                          f"{dim}-d vectors (e.g. {default_sub_quantizers(dim)})")
    if not 1 <= nbits <= 16:
        raise ConfigError(f"--pq-bits {nbits}: give 1 to 16 bits per code (8 is usual)")
    if not 1 <= nlist <= n:
        raise ConfigError(f"nlist {nlist}: give 1 to the {n} vectors")
    if n < 39 * 2 ** nbits:  # FAISS's floor: 39 training points per PQ centroid
        raise ConfigError(f"a {kind} index with {nbits}-bit codes needs at least "
                          f"{39 * 2 ** nbits:,} vectors to train on, the store has {n:,}: "
                          "use --kind flat (exact, and fast at this size), or fewer "
                          "--pq-bits")
    if int(params["rerank"]) < 0:
        raise ConfigError(f"--rerank {params['rerank']}: give 0 (no re-ranking) or k' >= k")
    index = faiss.index_factory(dim, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # the IndexIVFPQ
    ivf.nprobe = int(params["nprobe"])
    ivf.cp.niter = kmeans_iterations
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    # index_factory turns on polysemous training (a Hamming-code reordering that only
    # polysemous search uses): 20-100x the training time, for nothing here.
    ivf.do_polysemous_training = False
    return index


def pq_training_size(n: int, params: dict[str, Any], per_cell: int) -> int:
    """Rows to train on: ``per_cell`` per IVF cell, at least 64 per PQ centroid."""
    return int(min(n, max(per_cell * int(params["nlist"]),
                          64 * 2 ** int(params["nbits"]), PQ_TRAIN_MIN)))


def rerank(queries: np.ndarray, candidates: np.ndarray, k: int,
           vectors: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` among each query's ``candidates`` rows (-1: none), re-scored from
    ``vectors(rows)`` (unit float32 rows, read once for the distinct candidates).

    Returns similarities and rows ``(q, k)``, -inf / -1 where fewer than ``k`` candidates.
    """
    q = len(queries)
    sims = np.full((q, k), -np.inf, dtype=np.float32)
    rows = np.full((q, k), -1, dtype=np.int64)
    found = candidates >= 0
    if not found.any():
        return sims, rows
    distinct, inverse = np.unique(candidates[found], return_inverse=True)
    stored = np.asarray(vectors(distinct), dtype=np.float32)
    slot = np.full(candidates.shape, -1, dtype=np.int64)
    slot[found] = inverse
    exact = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for i in range(q):  # one small product per query: q x k' x D in all
        mine = slot[i][found[i]]
        exact[i, found[i]] = stored[mine] @ queries[i]
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    take = min(k, candidates.shape[1])
    sims[:, :take] = np.take_along_axis(exact, order, axis=1)
    rows[:, :take] = np.take_along_axis(candidates, order, axis=1)
    rows[~np.isfinite(sims)] = -1
    return sims, rows


def to_gpus(faiss: Any, index: Any, *, use_float16: bool = True) -> Any:
    """``index`` on every GPU faiss-gpu sees: one GPU, or sharded over all of them
    (``index_cpu_to_all_gpus``, ``shard=True``: the lists are split, the results merged).

    ``use_float16`` keeps the PQ look-up tables in float16, which GPU IVF-PQ needs for
    M >= 56 sub-quantizers at 8 bits. Never run here: no GPU was lent to this project.
    """
    ngpu = faiss.get_num_gpus()
    if ngpu < 1:
        raise ConfigError("no GPU seen by faiss: install faiss-gpu and check CUDA, or "
                          "search on the CPU")
    if ngpu == 1:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = use_float16
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, options)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = use_float16
    log.info("index sharded over %d GPUs", ngpu)
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=ngpu)
