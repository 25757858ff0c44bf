"""Search latency and recall of each index kind, on synthetic 512-d unit vectors.

For each size (default: 112,120 = NIH and 1,000,000) it builds the exact ``flat`` index and
the approximate ``ivf`` and ``hnsw`` ones with cxrembed's defaults (``IndexBuilder``, as ``build_index`` uses it), then
measures on held-out queries from the same distribution:

- build time;
- latency per query, one query at a time (``single``) and in one batch (``batched``);
- a single query restricted to one split (a bitmap over ~23% of rows, as ``--split test``);
- recall@10 against the exact search, at the default and a sweep of ``nprobe`` /
  ``efSearch``.

Vectors lie near a random 16-dimensional subspace (see :func:`synthetic`), closer to
real image embeddings than uniform noise on the sphere; ``--uniform`` gives that worst
case instead. Figures depend on the machine
and on what else runs on it: run on an idle one.

    python benchmarks/bench_search.py [--sizes 112120 1000000] [--queries 1000]
        [--kinds flat ivf hnsw] [--uniform]

The compressed kinds (``--kinds ivfpq opq``, for 10M+ vectors) run through a real store
on disk instead, as a user's would: the vectors are generated in seeded blocks and written
to a float16 store in ``--workdir`` (10M x 512: 10 GB; never held in memory at once), the
exact top-k of the queries is found block by block as they are written (the ground
truth), then ``build_index`` trains on a seeded sample of the store and adds it in blocks,
and ``search_vectors`` searches with re-ranking, reading the candidates' rows from the
store. Reported per kind: build time, index bytes (file and per vector), peak RSS of the
process so far, recall@10 against the exact search with and without re-ranking and for a
sweep of k', latency per query one at a time and batched.

    python benchmarks/bench_search.py --sizes 10000000 --kinds ivfpq opq --queries 300 \
        --single 50 --workdir /tmp/bench-search
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrembed.store.compressed import PQ_KINDS
from cxrembed.store.index import IndexBuilder, default_params, search_index

DIM = 512


def synthetic(n: int, dim: int, seed: int, latent: int, uniform: bool,
              block: int = 100_000) -> np.ndarray:
    """``n`` unit vectors, generated in blocks (1M x 512 float32 is 2 GB).

    Default: a random ``latent``-dimensional linear subspace plus isotropic noise (0.2 of
    the signal per dimension), normalised. Image embeddings have such a low intrinsic
    dimension; at 16 the mean top-1 cosine is ~0.8 and approximate search has a real
    recall / speed trade-off (a well separated mixture is trivially easy, uniform noise on
    the sphere has no meaningful neighbours: ``--uniform`` shows that worst case).
    """
    rng = np.random.default_rng(seed)
    basis = (rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        noise = rng.standard_normal(size=(m, dim), dtype=np.float32)
        if uniform:
            x = noise
        else:
            x = rng.standard_normal(size=(m, latent), dtype=np.float32) @ basis + 0.2 * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


class SyntheticVectors:
    """The distribution of :func:`synthetic`, drawn block by block from seeded streams."""

    def __init__(self, dim: int, seed: int, latent: int, uniform: bool) -> None:
        self.dim, self.latent, self.uniform = dim, latent, uniform
        rng = np.random.default_rng(seed)
        self.basis = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)

    def draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        noise = rng.standard_normal(size=(m, self.dim), dtype=np.float32)
        x = noise if self.uniform else (
            rng.standard_normal(size=(m, self.latent), dtype=np.float32) @ self.basis
            + 0.2 * noise)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB). It counts the pages
    of memory-mapped files too: re-ranking reads rows of the store through a memory map,
    and every page-cache page (or large folio) it touches joins the resident set, clean
    and reclaimable. :class:`AnonymousPeak` gives the process's own memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class AnonymousPeak:
    """The largest ``RssAnon`` (memory of the process's own, not file pages) seen by a
    thread that reads /proc/self/status every 20 ms (Linux; 0 elsewhere)."""

    def __init__(self) -> None:
        import threading

        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with open("/proc/self/status") as status:
                    for line in status:
                        if line.startswith("RssAnon:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except OSError:
                return

    def gib(self) -> float:
        return self.peak_kib / 2**20


ANON = None  # the run's AnonymousPeak (started in main)


def memory_so_far() -> str:
    anon = f"; own memory (RssAnon) {ANON.gib():.2f} GiB" if ANON is not None else ""
    return f"peak RSS {peak_rss_gib():.2f} GiB{anon}"


def write_store(path: Path, n: int, vectors: SyntheticVectors, queries: np.ndarray, k: int,
                seed: int, block: int = 65_536) -> np.ndarray:
    """A float16 store of ``n`` synthetic rows at ``path``, written block by block; returns
    the exact top-``k`` rows of ``queries`` among the unit vectors it holds."""
    from cxrembed.store import StoreWriter

    ids = np.char.add(np.char.zfill(np.arange(n).astype(str), 9), ".png")
    rng = np.random.default_rng(seed)
    rows = {"image_id": ids, "patient_id": np.arange(n, dtype=np.int64),
            "follow_up": np.zeros(n, np.int64),
            "split": np.array(["train", "val", "test"])[rng.integers(0, 3, n)],
            "view": np.full(n, "PA"), "sex": np.full(n, "F"),
            "age": np.full(n, np.nan, np.float32), "labels": np.zeros((n, 1), np.uint8),
            "image_path": ids}
    best_sim = np.full((len(queries), k), -np.inf, np.float32)
    best_row = np.full((len(queries), k), -1, np.int64)
    with StoreWriter.create(path, rows=rows, embed_dim=vectors.dim, label_names=["finding"],
                            fingerprint={"model": "synthetic"}, has_head=False, has_text=False,
                            batch_size=block, chunk_rows=block,
                            attrs={"model_name": "synthetic"}) as writer:
        del rows, ids
        for start in range(0, n, block):
            x = vectors.draw(rng, min(block, n - start))
            writer.append(x)
            held = x.astype(np.float16).astype(np.float32)  # what the store gives back
            held /= np.linalg.norm(held, axis=1, keepdims=True)
            sims = np.concatenate([best_sim, queries @ held.T], axis=1)
            cand = np.concatenate([best_row, np.broadcast_to(
                np.arange(start, start + len(x)), (len(queries), len(x)))], axis=1)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            best_sim = np.take_along_axis(sims, top, axis=1)
            best_row = np.take_along_axis(cand, top, axis=1)
        writer.finish()
    order = np.argsort(-best_sim, axis=1, kind="stable")
    return np.take_along_axis(best_row, order, axis=1)


def bench_on_disk(n: int, kinds: list[str], args: argparse.Namespace) -> None:
    """The compressed kinds through a store on disk (see the module docstring)."""
    from cxrembed.search import search_vectors
    from cxrembed.store import EmbeddingStore, build_index, index_path, load_index

    vectors = SyntheticVectors(DIM, args.seed, args.latent, args.uniform)
    queries = vectors.draw(np.random.default_rng(args.seed + 1), args.queries)
    folder = Path(tempfile.mkdtemp(prefix="bench-search-", dir=args.workdir))
    path = folder / f"store-{n}.h5"
    try:
        began = time.perf_counter()
        truth = write_store(path, n, vectors, queries, args.k, args.seed + 2)
        print(f"\n== {n:,} x {DIM} float16 store on disk ({path.stat().st_size / 1e9:.1f} GB, "
              f"written with the exact top-{args.k} in {time.perf_counter() - began:.0f} s; "
              f"{memory_so_far()})", flush=True)
        for kind in kinds:
            gc.collect()
            began = time.perf_counter()
            build_index(path, kind, params=args.params or None, centre="off")
            built = time.perf_counter() - began
            size = index_path(path).stat().st_size
            with EmbeddingStore.open(path) as store:
                loaded = load_index(store, mmap=False)
                info = loaded.info
                shown = ", ".join(f"{k}={v}" for k, v in info.params.items())
                print(f"{kind}: {shown}; built in {built:.0f} s; index file {size / 2**20:,.0f} "
                      f"MiB = {size / n:.1f} bytes per vector (codes + ids: "
                      f"{info.bytes_per_vector:.0f}); so far {memory_so_far()}",
                      flush=True)
                print(f"  {'rerank k_':<10} {'recall@10':>9} {'single ms':>10} {'batched ms':>11}")
                sweep = sorted({0, 10, 50, int(info.params["rerank"]), 200, 500})
                for rerank in sweep:
                    params = {"rerank": rerank}
                    began = time.perf_counter()
                    for query in queries[:args.single]:
                        search_vectors(store, query[None], args.k, index="index",
                                       index_params=params, loaded_index=loaded, centre="off")
                    one = (time.perf_counter() - began) / args.single * 1e3
                    began = time.perf_counter()
                    _, found = search_vectors(store, queries, args.k, index="index",
                                              index_params=params, loaded_index=loaded,
                                              centre="off")
                    batched = (time.perf_counter() - began) / len(queries) * 1e3
                    print(f"  {rerank:<10} {recall(found, truth):>9.4f} {one:>10.2f} "
                          f"{batched:>11.3f}", flush=True)
            del loaded
        print(f"whole run: {memory_so_far()} (the difference: pages of the memory-mapped "
              "store, which re-ranking reads)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def latency_ms(index, queries: np.ndarray, k: int, single: int, **kw) -> tuple[float, float]:
    """(ms per query one at a time, ms per query in one batch)."""
    began = time.perf_counter()
    for q in queries[:single]:
        search_index(index, q[None], k, **kw)
    one = (time.perf_counter() - began) / single * 1e3
    began = time.perf_counter()
    search_index(index, queries, k, **kw)
    batched = (time.perf_counter() - began) / len(queries) * 1e3
    return one, batched


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112_120, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"])
    parser.add_argument("--latent", type=int, default=16, help="intrinsic dimension")
    parser.add_argument("--uniform", action="store_true", help="uniform on the sphere")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the on-disk store of ivfpq/opq runs goes (default: TMPDIR)")
    parser.add_argument("--nlist", type=int, default=None, help="ivfpq/opq: cells")
    parser.add_argument("--nprobe", type=int, default=None, help="ivfpq/opq: cells visited")
    args = parser.parse_args()
    args.params = {key: value for key, value in (("nlist", args.nlist), ("nprobe", args.nprobe))
                   if value is not None}
    on_disk = [kind for kind in args.kinds if kind in PQ_KINDS]
    args.kinds = [kind for kind in args.kinds if kind not in PQ_KINDS]
    import faiss

    global ANON
    ANON = AnonymousPeak()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; vectors: "
          f"{'uniform on the sphere' if args.uniform else f'rank-{args.latent} + noise'}, "
          f"d={DIM}, k={args.k}, {args.queries} held-out queries")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start")
    for n in args.sizes:
        if on_disk:
            bench_on_disk(n, on_disk, args)
        if not args.kinds:
            continue
        began = time.perf_counter()
        data = synthetic(n + args.queries, DIM, args.seed, args.latent, args.uniform)
        base, queries = data[:n], np.ascontiguousarray(data[n:])
        split = np.random.default_rng(1).random(n) < 0.23  # a "test split" filter
        print(f"\n== {n:,} x {DIM} (generated in {time.perf_counter() - began:.1f} s)")
        print(f"{'kind':<5} {'params':<38} {'build s':>8} {'single ms':>10} {'batched ms':>11} "
              f"{'split ms':>9} {'recall@10':>10}")
        truth = None
        for kind in args.kinds:
            gc.collect()
            began = time.perf_counter()
            builder = IndexBuilder(kind, base.shape[1], len(base), None, None, seed=1234)
            builder.train(base)
            builder.add(base)
            index, params = builder.finish(), builder.params
            built = time.perf_counter() - began
            search_params = {k: v for k, v in params.items() if k in ("nprobe", "efSearch")}
            one, batched = latency_ms(index, queries, args.k, args.single, params=search_params)
            filtered, _ = latency_ms(index, queries[:args.single], args.k, args.single,
                                     allowed=split, params=search_params)
            _, found = search_index(index, queries, args.k, params=search_params)
            if kind == "flat":
                truth = found
            rec = recall(found, truth) if truth is not None else float("nan")
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "exact"
            print(f"{kind:<5} {shown:<38} {built:>8.1f} {one:>10.3f} {batched:>11.4f} "
                  f"{filtered:>9.3f} {rec:>10.4f}", flush=True)
            if truth is not None and kind != "flat":
                key = "nprobe" if kind == "ivf" else "efSearch"
                default = params[key]
                sweep = sorted({max(1, default // 4), max(1, default // 2), default * 2,
                                default * 4} - {default})
                for value in sweep:
                    _, found = search_index(index, queries, args.k, params={key: value})
                    _, batched = latency_ms(index, queries, args.k, 1, params={key: value})
                    print(f"{'':<5} {f'  {key}={value}':<38} {'':>8} {'':>10} {batched:>11.4f} "
                          f"{'':>9} {recall(found, truth):>10.4f}", flush=True)
            del index
        del data, base, queries
    print("\ndefaults:", {kind: default_params(kind, args.sizes[0]) for kind in
                          args.kinds + on_disk})
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
