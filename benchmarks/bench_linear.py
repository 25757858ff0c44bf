"""The linear head's solver against sklearn and scipy at the sweep's sizes, in one run.

    python benchmarks/bench_linear.py [--shots 1,16] [--draws 5]

One few-shot draw of the linear head solves 14 classes x 5 values of C of L2 logistic
regression on the unit vectors of the shots (K per class + K "No Finding": about 15 K
rows, 512 dims). Compared, on the same draws, one BLAS thread each:

* ``cxrembed``: heads/linear.py's ``fit_logistic``, all 70 problems as one batched
  L-BFGS in the row space of the shots;
* ``sklearn``: ``LogisticRegression(C=C, solver="lbfgs")`` once per class and C (what the
  head would call without its own solver), same tolerance as sklearn's default;
* ``scipy``: ``scipy.optimize.minimize(method="L-BFGS-B")`` on the sum of the 70
  objectives (independent, so one joint minimum), same row-space reduction.

Reported: ms per draw, the ratio to cxrembed, and the largest difference of the fitted
coefficients from sklearn's (scaled by the largest coefficient).

    python benchmarks/bench_linear.py --fit-rows 100000 [--baseline REV] [--work DIR]

``cxrembed fit STORE --head linear --all`` on a store of that many rows shaped like an
untrained cxr-tiny encoder's (what benchmarks/memory.py fits on; :func:`tiny_like_store`),
each run in its own process: this tree, and with ``--baseline`` the code of an older
revision (``git archive`` into a temporary folder) on the same store. Reported: CPU
seconds (user + system of the process), wall seconds, peak RSS, the C selected, and the
largest difference of the two heads' val decision values (scaled by their spread).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def draws(shots: int, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` few-shot training samples of the NIH-size synthetic store."""
    from bench_fewshot import synthetic_store

    from cxrembed.fewshot import sample_shots

    data = synthetic_store(seed=seed, rows=30_000)
    out = []
    for s in range(n):
        rows = sample_shots(data.labels, data.split, shots, s)
        x = data.vectors(rows)[1].astype(np.float64)
        out.append((x, data.labels[rows]))
    return out


def with_sklearn(x: np.ndarray, y: np.ndarray, Cs: tuple[float, ...]) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((x.shape[1], y.shape[1] * len(Cs)))
    for j, C in enumerate(Cs):
        for c in range(y.shape[1]):
            if 0 < y[:, c].sum() < len(y):
                model = LogisticRegression(C=C, max_iter=1000).fit(x, y[:, c])
                coef[:, j * y.shape[1] + c] = model.coef_[0]
    return coef


def with_scipy(x: np.ndarray, t: np.ndarray, C: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    n = len(x)
    _, sing, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[sing > sing[0] * 1e-10].T
    xb = np.hstack([x @ basis, np.ones((n, 1))])
    d, k = basis.shape[1], t.shape[1]
    ridge = 1.0 / (C * n)

    def fg(flat: np.ndarray) -> tuple[float, np.ndarray]:
        theta = flat.reshape(d + 1, k)
        margin = t * (xb @ theta)
        w = theta[:d]
        loss = np.logaddexp(0.0, -margin).sum() / n + 0.5 * (ridge * (w * w)).sum()
        g = xb.T @ (-t * np.exp(-np.logaddexp(0.0, margin)) / n)
        g[:d] += ridge * w
        return loss, g.ravel()

    res = minimize(fg, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 15000, "gtol": 1e-6 / k})
    return basis @ res.x.reshape(d + 1, k)[:d]


#: Spectrum of an untrained cxr-tiny store (the demo's synthetic twin, 2,000 images): std
#: of the unit vectors along their j-th principal direction, measured at these j.
TINY_SPECTRUM = ((0, 3.4e-2), (1, 2.4e-2), (5, 1.3e-2), (10, 9.4e-3), (20, 6.1e-3),
                 (50, 1.8e-3), (100, 1.6e-5), (200, 8.4e-6), (300, 5.7e-6), (400, 3.0e-6),
                 (511, 6.2e-7))
TINY_MEAN_COSINE = 0.9956  # the same store's mean cosine between images


def tiny_like_store(path: Path, rows: int, seed: int = 0) -> Path:
    """A store of ``rows`` vectors shaped like an untrained cxr-tiny encoder's (nearly
    parallel rows, a steep spectrum: the geometry `benchmarks/memory.py` fits on), NIH
    label prevalences with a planted signal of the size measured there, 70/10/20 split by
    patient. Written in blocks (RSS stays far below the vectors' size)."""
    from cxrembed.labels import LABELS, NIH_PREVALENCE
    from cxrembed.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    dim = 512
    j = np.arange(dim)
    knots = np.array(TINY_SPECTRUM)
    spread = np.exp(np.interp(j, knots[:, 0], np.log(knots[:, 1])))
    axes = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    mean = axes[:, -1] * np.sqrt(TINY_MEAN_COSINE)  # along a direction of least spread
    # each class shifts images along a direction of the top 20 principal axes
    signal = rng.normal(size=(14, 20)) @ axes[:, :20].T
    signal *= 0.03 / np.linalg.norm(signal, axis=1, keepdims=True)
    labels = (rng.random((rows, 14)) < np.array(NIH_PREVALENCE)).astype(np.uint8)
    patients = np.arange(rows) // 3  # three images per patient
    split = np.array(["train"] * 7 + ["val"] + ["test"] * 2)[patients % 10]
    ids = np.array([f"{i:08d}_000.png" for i in range(rows)])
    table = {"image_id": ids, "patient_id": patients.astype(np.int64),
             "follow_up": np.zeros(rows, np.int64), "split": split,
             "view": np.full(rows, "PA"), "sex": np.full(rows, "F"),
             "age": np.full(rows, 50, np.float32), "labels": labels, "image_path": ids}
    batch = 4096
    with StoreWriter.create(path, rows=table, embed_dim=dim, fingerprint={"model": "tiny-like"},
                            has_head=False, has_text=False, batch_size=batch,
                            chunk_rows=batch * 4, attrs={"model_name": "tiny-like"},
                            label_names=list(LABELS)) as writer:
        for start in range(0, rows, batch):
            stop = min(rows, start + batch)
            block = (rng.normal(size=(stop - start, dim)) * spread) @ axes.T + mean
            block += labels[start:stop] @ signal
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            writer.append((17.0 * block).astype(np.float32))
        writer.finish()
    return path


def fit_all(store: Path, out: Path, code: Path) -> dict:
    """``cxrembed fit STORE --head linear --all`` with the package found at ``code``."""
    argv = [sys.executable, "-c", "from cxrembed.cli import main; main()", "fit", str(store),
            "--head", "linear", "--all", "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=code,  # cwd: `-c` puts it first on sys.path
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"fit with {code} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "wall": wall,
            "rss": usage.ru_maxrss / 1024, "out": out}


def fit_benchmark(rows: int, baseline: str | None, work: Path) -> None:
    """The ``--fit-rows`` mode (see the module doc)."""
    import json

    from cxrembed.store import EmbeddingStore

    store = work / f"tiny-like-{rows}.h5"
    if not store.exists():
        tiny_like_store(store, rows)
    runs = {"this tree": Path(__file__).resolve().parents[1]}
    if baseline:
        old = work / f"code-{baseline}"
        if not old.exists():
            old.mkdir()
            archive = subprocess.run(["git", "archive", baseline, "cxrembed"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        runs[f"baseline {baseline}"] = old
    print(f"cxrembed fit STORE --head linear --all: {rows:,}-row store shaped like an "
          f"untrained cxr-tiny encoder's; load average {os.getloadavg()[0]:.1f} at start")
    results = {name: fit_all(store, work / f"head-{i}", code)
               for i, (name, code) in enumerate(runs.items())}
    with EmbeddingStore.open(store) as opened:
        val = opened.embeddings(np.flatnonzero(opened.split == "val"), normalized=True)
    scores = {}
    for name, result in results.items():
        card = json.loads((result["out"] / "head.json").read_text())
        arrays = np.load(result["out"] / "head.npz")
        scores[name] = val @ arrays["coef"] + arrays["intercept"]
        print(f"  {name:>20}: CPU {result['cpu']:6.1f} s, wall {result['wall']:6.1f} s, "
              f"peak RSS {result['rss']:5.0f} MiB, C {card['selected']['C']}, "
              f"solver iterations {card['selected']['iterations']}")
    if baseline:
        new, old = scores["this tree"], scores[f"baseline {baseline}"]
        spread = np.ptp(old, axis=0)
        print(f"  largest |new - old| val decision value / its spread: "
              f"{float(np.max(np.abs(new - old).max(axis=0) / spread)):.1e}; CPU ratio "
              f"old/new {results[f'baseline {baseline}']['cpu'] / results['this tree']['cpu']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="1,16")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--fit-rows", type=int, help="time `fit --all` on a store this big")
    parser.add_argument("--baseline", help="with --fit-rows: also the code of this revision")
    parser.add_argument("--work", type=Path, help="with --fit-rows: folder for the store")
    args = parser.parse_args()
    if args.fit_rows:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            fit_benchmark(args.fit_rows, args.baseline, args.work)
        else:
            with tempfile.TemporaryDirectory() as work:
                fit_benchmark(args.fit_rows, args.baseline, Path(work))
        return
    from threadpoolctl import threadpool_limits

    from cxrembed.heads.linear import LinearConfig, fit_logistic

    Cs = LinearConfig().Cs
    print(f"{args.draws} draws per shot count, 14 classes x C in {Cs}; 1 BLAS thread; "
          "CPU ms per draw (best of 2)")
    print(f"{'shots':>5} {'rows':>5} {'cxrembed':>9} {'sklearn':>9} {'scipy':>9}  "
          f"{'sklearn/cxr':>11} {'scipy/cxr':>9}  max coef diff vs sklearn (cxr, scipy)")
    for shots in (int(k) for k in args.shots.split(",")):
        samples = draws(shots, args.draws)
        times = {"cxrembed": [], "sklearn": [], "scipy": []}
        diffs = []
        with threadpool_limits(1):
            for x, y in samples:
                fit = [c for c in range(14) if 0 < y[:, c].sum() < len(y)]
                t = np.tile(2.0 * y[:, fit] - 1, (1, len(Cs)))
                C = np.repeat(np.asarray(Cs), len(fit))
                runs = {"cxrembed": lambda: fit_logistic(x, t, C)[0],
                        "sklearn": lambda: with_sklearn(x, y, Cs),
                        "scipy": lambda: with_scipy(x, t, C)}
                out = {}
                for name, run in runs.items():
                    best = float("inf")
                    for _ in range(2):
                        t0 = time.process_time()
                        out[name] = run()
                        best = min(best, time.process_time() - t0)
                    times[name].append(1000 * best)
                ref = np.zeros((x.shape[1], len(Cs) * len(fit)))
                for j in range(len(Cs)):
                    ref[:, j * len(fit):(j + 1) * len(fit)] = out["sklearn"][
                        :, [j * 14 + c for c in fit]]
                scale = max(1.0, np.abs(ref).max())
                diffs.append((np.abs(out["cxrembed"] - ref).max() / scale,
                              np.abs(out["scipy"] - ref).max() / scale))
        m = {k: float(np.mean(v)) for k, v in times.items()}
        d = np.max(diffs, axis=0)
        print(f"{shots:5d} {len(samples[0][0]):5d} {m['cxrembed']:9.1f} {m['sklearn']:9.1f} "
              f"{m['scipy']:9.1f}  {m['sklearn'] / m['cxrembed']:10.2f}x "
              f"{m['scipy'] / m['cxrembed']:8.2f}x  {d[0]:.1e}, {d[1]:.1e}")


if __name__ == "__main__":
    main()
