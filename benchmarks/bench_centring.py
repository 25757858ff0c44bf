"""Does centring (subtracting the store's mean vector) help similarity search?

For each store given: embedding health, then label precision@10 of exact search on unit
vectors, raw and centred (``x - mean`` over the store, re-normalised), every image a query
against every other image of another patient (numpy brute force):

- ``share``: share of the 10 neighbours with at least one positive label in common with
  the query, over queries with at least one positive label;
- ``exact``: share of the 10 neighbours whose 14-label vector equals the query's (No
  Finding matches No Finding), over every query;
- ``agree`` ("finding status", the figure that decides): ``share`` for queries with a
  finding, "the neighbour is No Finding too" for No Finding queries, over every query.
  ``cxrembed encode`` measures this same figure on each store it writes
  (:mod:`cxrembed.store.centring`, on a seeded sample of up to 2,000 labelled queries
  against every row) and ``--centre auto`` centres when it is at least as high centred.

Chance: the same figures for random unit vectors.

Usage: python benchmarks/bench_centring.py [STORE.h5 ...] [--images N]
Without stores, ``cxrembed demo --images N --seeds 1`` runs into a temporary folder first
and its ``store-frozen.h5`` and ``store-adapted.h5`` (the synthetic twin, cxr-tiny) are
measured.

Measured (benchmarks/RESULTS.md, section centring): centring raises the ``share`` figure
but lowers No Finding queries' precision; on ``agree`` it loses on the frozen store and
wins narrowly on the adapted one, so ``auto`` leaves the frozen store uncentred and
centres the adapted one. The decision is per store, by ``agree`` alone: ``share`` ignores
No Finding queries (about half of every query), and a transform can raise it by pulling
normal images apart.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrembed.store import EmbeddingStore
from cxrembed.store.health import embedding_health, sample_rows

K = 10


def precision_at_k(x: np.ndarray, labels: np.ndarray, patients: np.ndarray, k: int = K
                   ) -> dict[str, float]:
    """Label precision@k of exact inner-product search, other patients only."""
    sims = x @ x.T
    sims[patients[:, None] == patients[None, :]] = -np.inf  # the query and its patient
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    y = labels.astype(bool)
    shares = (y[:, None, :] & y[top]).any(axis=2)  # (n, k)
    positive = y.any(axis=1)
    exact = (y[:, None, :] == y[top]).all(axis=2)
    # the query's finding status: a shared positive label, or No Finding for No Finding
    agree = np.where(positive[:, None], shares, ~y[top].any(axis=2))
    return {"share": float(shares[positive].mean()), "exact": float(exact.mean()),
            "agree": float(agree.mean()), "queries": int(len(x)),
            "with_positive": int(positive.sum())}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def demo_stores(folder: Path, images: int) -> list[str]:
    """Run the demo (synthetic twin, cxr-tiny) into ``folder``; its two stores."""
    subprocess.run([sys.executable, "-m", "cxrembed", "demo", "--out", str(folder),
                    "--images", str(images), "--seeds", "1", "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    return [str(folder / "store-frozen.h5"), str(folder / "store-adapted.h5")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="*")
    parser.add_argument("--images", type=int, default=2000, help="demo twin size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.stores or demo_stores(Path(tmp) / "demo", args.images)
        if not args.stores:
            print(f"cxrembed demo --images {args.images} --seeds 1 (synthetic twin, cxr-tiny)")
        measure(paths)


def measure(paths: list[str]) -> None:
    for path in paths:
        began = time.perf_counter()
        with EmbeddingStore.open(path) as store:
            x = store.embeddings().astype(np.float64)
            labels, patients = store.labels, store.patient_id
        mean = x.mean(axis=0)
        health = embedding_health(x[sample_rows(np.arange(len(x)))])
        centred = unit(x - mean)
        health_c = embedding_health(centred[sample_rows(np.arange(len(x)))])
        raw = precision_at_k(x, labels, patients)
        cen = precision_at_k(centred, labels, patients)
        rng = np.random.default_rng(0)
        chance = precision_at_k(unit(rng.normal(size=x.shape)), labels, patients)
        print(f"{Path(path).name}: {len(x):,} images, {x.shape[1]}-d")
        print(f"  health raw     mean cosine {health['mean_cosine']:.4f}, effective rank "
              f"{health['effective_rank']:.1f} (sample {health['sample_size']})")
        print(f"  health centred mean cosine {health_c['mean_cosine']:.4f}, effective rank "
              f"{health_c['effective_rank']:.1f}")
        print(f"  label precision@{K} (share >=1 positive, {raw['with_positive']:,} queries): "
              f"raw {raw['share']:.4f}, centred {cen['share']:.4f}, chance {chance['share']:.4f}")
        print(f"  label precision@{K} (exact label vector, {raw['queries']:,} queries): "
              f"raw {raw['exact']:.4f}, centred {cen['exact']:.4f}, chance {chance['exact']:.4f}")
        print(f"  label precision@{K} (finding status: a shared positive, or No Finding for "
              f"No Finding; every query): raw {raw['agree']:.4f}, centred {cen['agree']:.4f}, "
              f"chance {chance['agree']:.4f}")
        print(f"  ({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
