"""The few-shot sweep's per-cell costs outside training, old code against new in one run:
the patient-bootstrap scorer and the knn / Tip-Adapter / zero-shot predictions.

    python benchmarks/bench_scoring.py [--baseline REV] [--repeats 5]

Sizes: NIH's test split (25,596 rows of 2,797 patients, 14 classes at NIH prevalence);
scoring with 100 resamples + the point (one seed's cell under ``ci=pooled``) and 1,000 (a
training-free head); knn and tip on 512-d unit vectors against 1- and 16-shot samples
(15 and 240 shots), one BLAS thread as in the sweep. Each figure is the best of
``--repeats`` CPU times (process time, all threads). The baseline revision (default: the
code before this work) is taken with ``git archive`` into a temporary folder; each side
runs in its own process on the same seeded data, and their outputs are compared
(``max |old - new|``: 0 means the same numbers bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

BASELINE = "7b94052"
N_TEST, N_PATIENTS, DIM = 25_596, 2_797, 512

CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from cxrembed.heads import make_head
from cxrembed.heads.base import unit_rows
from cxrembed.labels import NIH_PREVALENCE
from cxrembed.metrics import replicate_aucs, resample_patients

n, patients, dim, repeats, out = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                  int(sys.argv[4]), sys.argv[5])
rng = np.random.default_rng(0)
pid = np.sort(np.concatenate([np.arange(patients), rng.integers(0, patients, n - patients)]))
labels = (rng.random((n, 14)) < np.array(NIH_PREVALENCE)).astype(np.uint8)
scores = (labels + rng.normal(size=labels.shape)).astype(np.float32).astype(np.float64)
weights = resample_patients(patients, 1000, 0)
x = unit_rows(rng.normal(size=(n, dim)).astype(np.float32))
text = {f"class {c}": (rng.normal(size=(2, dim)).astype(np.float32),
                       rng.normal(size=(1, dim)).astype(np.float32)) for c in range(14)}
times, results = {}, {}

def best(name, f):
    t = []
    for _ in range(repeats):
        c0 = time.process_time(); value = f(); t.append(time.process_time() - c0)
    times[name] = 1000 * min(t)
    results[name] = value

with threadpool_limits(1):
    best("score 100 resamples", lambda: np.vstack(replicate_aucs(labels, scores, pid,
                                                                 weights[:, ::10])))
    best("score 1000 resamples", lambda: np.vstack(replicate_aucs(labels, scores, pid,
                                                                  weights)))
    for shots in (1, 16):
        k = 15 * shots
        keys = unit_rows(rng.normal(size=(k, dim)).astype(np.float32))
        y_shot = (rng.random((k, 14)) < 0.3).astype(np.uint8)
        x_val = unit_rows(rng.normal(size=(k, dim)).astype(np.float32))
        y_val = (rng.random((k, 14)) < 0.3).astype(np.uint8)
        similarity = x @ keys.T
        knn = make_head("knn").fit(keys, y_shot)
        best(f"knn predict {shots}-shot", lambda: knn.predict(x, similarity=similarity))
        tip = make_head("tip", text=text)
        best(f"tip fit {shots}-shot", lambda: tip.fit(keys, y_shot, x_val, y_val).selected)
        logits = tip.zeroshot.logits(x)
        best(f"tip predict {shots}-shot", lambda: tip.predict(x, similarity=similarity,
                                                              text_logits=logits))
    zeroshot = make_head("zeroshot", text=text)
    best("zeroshot predict", lambda: zeroshot.predict(x))
np.savez(out, **{k: np.asarray(v if not isinstance(v, dict) else [v["alpha"], v["beta"]],
                               dtype=np.float64) for k, v in results.items()})
import cxrembed
times["code"] = cxrembed.__file__
print(json.dumps(times))
"""


def extract(rev: str) -> str:
    """The package at git revision ``rev``, extracted to a temporary folder."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"],
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = tempfile.mkdtemp(prefix=f"cxrembed-{rev[:12]}-")
    archive = subprocess.run(["git", "archive", rev, "cxrembed"], cwd=root,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def run_side(code: str, repeats: int, out: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    # cwd: a folder without a cxrembed package (python -c puts the cwd first on sys.path)
    done = subprocess.run([sys.executable, "-c", CHILD, str(N_TEST), str(N_PATIENTS),
                           str(DIM), str(repeats), out], env=env, capture_output=True,
                          text=True, timeout=1800, cwd=os.path.dirname(out))
    if done.returncode:
        raise RuntimeError(f"benchmark with {code} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        old_code = extract(args.baseline)
        try:
            old = run_side(old_code, args.repeats, os.path.join(tmp, "old.npz"))
        finally:
            shutil.rmtree(old_code, ignore_errors=True)
        new = run_side(here, args.repeats, os.path.join(tmp, "new.npz"))
        old_out, new_out = np.load(os.path.join(tmp, "old.npz")), np.load(os.path.join(tmp,
                                                                                  "new.npz"))
        print(f"{N_TEST:,} test rows, {N_PATIENTS:,} patients, 14 classes; best of "
              f"{args.repeats} CPU times; load {load:.1f} before, {os.getloadavg()[0]:.1f} "
              f"after ({os.cpu_count()} cores)")
        print(f"{'':26s} {'old ms':>9s} {'new ms':>9s} {'ratio':>7s}  max |old - new|")
        print(f"old: {old.pop('code')}\nnew: {new.pop('code')}")
        for name in old:
            a, b = old_out[name], new_out[name]
            same = np.array_equal(np.isnan(a), np.isnan(b))
            diff = np.nanmax(np.abs(a - b), initial=0.0) if same else float("nan")
            print(f"{name:26s} {old[name]:9.1f} {new[name]:9.1f} {old[name] / new[name]:6.2f}x"
                  f"  {diff:.3g}" + ("" if same else " (NaN pattern differs)"))


if __name__ == "__main__":
    main()
