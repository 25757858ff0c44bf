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
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

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
    args = parser.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; vectors: "
          f"{'uniform on the sphere' if args.uniform else f'rank-{args.latent} + noise'}, "
          f"d={DIM}, k={args.k}, {args.queries} held-out queries")
    for n in args.sizes:
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
    print("\ndefaults:", {kind: default_params(kind, args.sizes[0]) for kind in args.kinds})


if __name__ == "__main__":
    main()
