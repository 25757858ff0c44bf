"""The full few-shot sweep on an NIH-size store of synthetic vectors: the code of an older
revision and this tree in the same run (ratio), and the paper's approach of passing images
through the encoder for every few-shot run.

    python benchmarks/bench_fewshot.py [--quick] [--rows 2000] [--baseline REV | --baseline '']
                                       [--forward-ms MS | --no-paper] [--device cuda]

Store: 112,120 x 512 float16 vectors (as the HDF5 store keeps them), NIH label
prevalences, 30,805 patients, the official test size (25,596 images of 2,797 patients),
a planted class signal so heads have something to learn (``--rows 2000``: the demo's
twin size, same proportions). Sweep: shots 1,2,4,8,16 x 10 seeds x heads mlp, linear,
knn, tip (+ zeroshot once), 1,000 patient resamples for the intervals. Targets (issue 14):
NIH size under 10 s wall and 20 s CPU on 2 cores; 2,000 rows under 5 s.

Old against new: ``--baseline REV`` (default: the code before the speed work) is taken
with ``git archive`` into a temporary folder (no second copy of the code in the
repository); each sweep runs in its own process, one after the other, on the same data
and seeds, and the per-head mean AUCs are compared cell by cell.

The paper's approach re-encodes the test images for every few-shot run (one (shots,
seed) draw; we count one test pass per draw, not per head, and ignore the passes over
the training shots, so the figure below is a lower bound on its cost). The encoder's
forward cost per image is measured here with ViT-B-32 (``pretrained=none``, weights do
not change the cost) on a small CPU batch, in a subprocess after the sweeps;
``--forward-ms`` gives it instead (e.g. the figure from bench_encode).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

N_ROWS, DIM = 112_120, 512
N_TEST, N_TEST_PATIENTS, N_PATIENTS = 25_596, 2_797, 30_805
SHOTS = (1, 2, 4, 8, 16)
HEADS = ("mlp", "linear", "knn", "tip", "zeroshot")
#: the code before issue 14 (the speed work): what every figure is compared with
BASELINE = "588b599"
#: the MLP head's Linear layers (in, out) at these sizes: model.head.DiagnosisHead
MLP_LAYERS = ((DIM, 512), (512, 256), (256, 14))
MLP_PARAMS = sum(i * o + o for i, o in MLP_LAYERS) + 2 * (512 + 256)  # + LayerNorms

FLOOR_SNIPPET = r"""
import json, sys, time, torch
threads, rows, inner, cols = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
a, b = torch.randn(rows, inner), torch.randn(inner, cols)
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter())
           for _ in range(3))
big = torch.empty(2**26)  # 256 MiB: past every cache
out = torch.empty_like(big)
out.copy_(big)
copy = min((lambda t: (out.copy_(big), time.perf_counter() - t)[1])(time.perf_counter())
           for _ in range(3))
print(json.dumps({"gflops": 2 * rows * inner * cols / best / 1e9,
                  "copy_gbs": 2 * big.numel() * 4 / copy / 1e9}))
"""

FORWARD_SNIPPET = r"""
import json, sys, time, torch, open_clip
batch = int(sys.argv[1])
model = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # fp32, as the paper ran it
x = torch.randn(batch, 3, 224, 224)
with torch.no_grad():
    model.encode_image(x)
    times = []
    for _ in range(3):
        t = time.perf_counter(); model.encode_image(x); times.append(time.perf_counter() - t)
print(json.dumps({"ms_per_image": 1000 * min(times) / batch, "batch": batch,
                  "threads": torch.get_num_threads()}))
"""


def synthetic_store(seed: int = 0, rows: int = N_ROWS):
    """EvalData shaped like NIH ChestX-ray14 encoded with a 512-d encoder; ``rows`` scales
    it (the test split, patients and prevalences keep NIH's proportions)."""
    from cxrembed.fewshot import EvalData
    from cxrembed.labels import LABELS, NIH_PREVALENCE

    scale = rows / N_ROWS
    n_test = max(1, round(N_TEST * scale))
    n_test_patients = max(1, min(n_test, round(N_TEST_PATIENTS * scale)))
    n_patients = max(n_test_patients + 1, round(N_PATIENTS * scale))
    rng = np.random.default_rng(seed)
    # Patients: the test patients own exactly n_test images; the rest share the others.
    test_pid = np.sort(rng.integers(0, n_test_patients, n_test))
    test_pid[:n_test_patients] = np.arange(n_test_patients)  # every test patient has one
    other_pid = rng.integers(n_test_patients, n_patients, rows - n_test)
    patient = np.concatenate([other_pid, test_pid])
    is_val = rng.random(n_patients) < 0.1
    split = np.where(patient < n_test_patients, "test",
                     np.where(is_val[patient], "val", "train"))
    labels = (rng.random((rows, 14)) < np.array(NIH_PREVALENCE)).astype(np.uint8)
    directions = rng.normal(size=(14, DIM)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    raw = np.empty((rows, DIM), dtype=np.float16)
    for start in range(0, rows, 16384):  # float16, like the store, built in blocks
        block = rng.normal(size=(min(16384, rows - start), DIM)).astype(np.float32)
        block += 2.0 * labels[start:start + len(block)].astype(np.float32) @ directions
        raw[start:start + len(block)] = 10 * block / np.sqrt(DIM)
    text = {name: ((directions[c] + 0.1 * rng.normal(size=(2, DIM))).astype(np.float32),
                   (-directions[c] + 0.1 * rng.normal(size=(1, DIM))).astype(np.float32))
            for c, name in enumerate(LABELS)}
    return EvalData(labels=labels, patient_id=patient, split=split,
                    embeddings=lambda rows: raw[rows].astype(np.float32), text=text,
                    source={"store": "synthetic NIH-size", "rows": rows})


def measure_forward(batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", FORWARD_SNIPPET, str(batch)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"forward measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace) -> None:
    """One sweep with whatever cxrembed is importable; one JSON line on stdout."""
    import cxrembed.fewshot.sweep as sweep_module
    from cxrembed.fewshot import run_fewshot

    if args.predict_threads and hasattr(sweep_module, "PREDICT_THREADS"):
        sweep_module.PREDICT_THREADS = args.predict_threads
    t0 = time.perf_counter()
    data = synthetic_store(rows=args.rows)
    build_s = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    options = {"shots": SHOTS, "seeds": args.seeds, "heads": HEADS, "bootstrap": args.bootstrap}
    if args.device != "cpu":
        options["device"] = args.device
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = run_fewshot(data, **options)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    per_head = defaultdict(list)
    for run in result.runs:
        if run["shots"]:
            per_head[run["head"]].append(run["seconds"])
    n_test = int((data.split == "test").sum())
    print(json.dumps({
        "code": __import__("cxrembed").__file__, "wall_s": wall, "cpu_s": cpu,
        "build_s": build_s, "load": [load_before, os.getloadavg()[0]],
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "data_gb": rss_data, "n_test": n_test,
        "n_test_patients": int(len(np.unique(data.patient_id[data.split == "test"]))),
        "ci": result.config.ci, "timing": result.timing,
        "ms_per_cell": {h: [1000 * float(np.mean(v)), 1000 * float(max(v))]
                        for h, v in per_head.items()},
        "summary": [{"head": r["head"], "shots": r["shots"], **r["mean_auc"]}
                    for r in result.summary],
        "mlp_work": mlp_work(result.runs, n_test, result.config.head_options)}))


def mlp_work(runs: list[dict], n_test: int, head_options: dict) -> dict:
    """The MLP head's arithmetic in this sweep, from its shapes and the epochs each member
    actually ran (``selected``): test-prediction and training multiply-adds x 2 (FLOP),
    member-steps, and the bytes its AdamW state moves (read parameter, gradient and both
    moments, write parameter and moments: 7 x 4 bytes a parameter a member-step)."""
    macs = sum(i * o for i, o in MLP_LAYERS)
    first = MLP_LAYERS[0][0] * MLP_LAYERS[0][1]  # no input gradient for the first layer
    batch = head_options.get("mlp", {}).get("batch_size", 16)
    mlp = [r for r in runs if r["head"] == "mlp" and r["shots"]]
    train_flop = steps = 0
    for r in mlp:
        epochs = r["selected"]["epochs_run"]
        # forward, weight gradients, input gradients over the rows trained; val forward
        train_flop += epochs * (2 * r["n_train"] * (3 * macs - first) + 2 * r["n_val"] * macs)
        steps += epochs * -(-r["n_train"] // batch)
    return {"heads": len(mlp), "predict_flop": 2 * len(mlp) * n_test * macs,
            "train_flop": train_flop, "member_steps": steps,
            "adamw_bytes": 7 * 4 * MLP_PARAMS * steps}


def measure_floor(threads: int, rows: int = N_TEST) -> dict:
    """fp32 GEMM rate (rows x 512 @ 512 x 2,048, the MLP's first layer for 4 heads; best
    of 3) and a 256 MiB copy's memory rate, with ``threads`` torch threads, in a child."""
    out = subprocess.run([sys.executable, "-c", FLOOR_SNIPPET, str(threads), str(rows),
                          str(DIM), "2048"], capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"GEMM measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_floor(new: dict, floors: dict[int, dict]) -> None:
    """The MLP head's fp32 floor at the rates measured in this run, beside its times."""
    work, one, two = new["mlp_work"], floors[1], floors[2]
    if not work["heads"]:
        return
    print(f"fp32 floor measured in this run: GEMM {new['n_test']:,}x{DIM} @ {DIM}x2,048 "
          f"{one['gflops']:.0f} GFLOPS with 1 thread, {two['gflops']:.0f} with 2; "
          f"memory copy {one['copy_gbs']:.1f} GB/s (1 thread), {two['copy_gbs']:.1f} (2)")
    predict_s = new["timing"].get("predict_s", {}).get("mlp")
    measured = (f"; measured {predict_s:.1f} s wall" if predict_s is not None else "")
    flop = work["predict_flop"]
    print(f"  mlp test predictions: {work['heads']} heads x {new['n_test']:,} rows = "
          f"{flop / 1e12:.3f} TFLOP: {flop / one['gflops'] / 1e9:.1f} s at 1 thread, "
          f"{flop / two['gflops'] / 1e9:.1f} s at 2{measured}")
    fit_s = new["timing"]["fit_predict_s"]["mlp"] - (predict_s or 0.0)
    print(f"  mlp training: {work['member_steps']:,} member-steps, {work['train_flop'] / 1e12:.3f} "
          f"TFLOP (forward + backward on the rows trained, val passes): "
          f"{work['train_flop'] / one['gflops'] / 1e9:.1f} s at 1 thread; AdamW state "
          f"{work['adamw_bytes'] / 1e9:.0f} GB moved: {work['adamw_bytes'] / one['copy_gbs'] / 1e9:.1f}"
          f" s at the copy rate" + (f"; measured {fit_s:.1f} s wall" if predict_s is not None
                                    else f"; measured fit + predict {fit_s:.1f} s wall"))


def extract(rev: str) -> str:
    """The package at git revision ``rev``, extracted to a temporary folder (no checkout)."""
    import tempfile

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=os.path.dirname(
        os.path.abspath(__file__)), capture_output=True, text=True, check=True).stdout.strip()
    folder = tempfile.mkdtemp(prefix=f"cxrembed-{rev[:12]}-")
    archive = subprocess.run(["git", "archive", rev, "cxrembed"], cwd=root,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def sweep_in(code: str | None, args: argparse.Namespace) -> dict:
    """Run one sweep in a child process importing cxrembed from ``code`` (None: this tree)."""
    env = dict(os.environ)
    root = code or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", str(args.rows),
           "--seeds", str(args.seeds), "--bootstrap", str(args.bootstrap), "--device",
           args.device if code is None else "cpu",
           "--predict-threads", str(args.predict_threads if code is None else 0)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"sweep with {root} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(tag: str, r: dict) -> None:
    print(f"{tag}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s (all threads), peak RSS "
          f"{r['peak_gb']:.2f} GB (data {r['data_gb']:.2f}); load {r['load'][0]:.1f} before, "
          f"{r['load'][1]:.1f} after ({os.cpu_count()} cores, shared)")
    t = r["timing"]
    cells = ", ".join(f"{h} {m:.0f} ms (max {x:.0f})" for h, (m, x) in r["ms_per_cell"].items())
    print(f"  fit + predict per cell: {cells}; zeroshot {1000 * t['fit_predict_s']['zeroshot']:.0f}"
          f" ms; scoring {t['scoring_s']:.1f} s in all, waited {t['scoring_wait_s']:.1f} s")
    if "predict_s" in t:
        print("  of which test predictions, in all: " + ", ".join(
            f"{h} {s:.1f} s" for h, s in t["predict_s"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 200 resamples")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=N_ROWS,
                        help="store size (2000: the demo's twin)")
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision to compare with, run in the same benchmark ('' "
                             "to skip)")
    parser.add_argument("--device", default="cpu", help="device of the new code's sweep")
    parser.add_argument("--forward-ms", type=float, default=None,
                        help="encoder forward ms per image (default: measure ViT-B-32)")
    parser.add_argument("--no-paper", action="store_true",
                        help="skip the paper's-approach estimate (no ViT-B-32 forward)")
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--predict-threads", type=int, default=0,
                        help="threads for the new code's test predictions (0: its default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.bootstrap = 2, 200
    if args.child:
        run_child(args)
        return

    old = sweep_in(extract(args.baseline), args) if args.baseline else None
    new = sweep_in(None, args)
    print(f"store: {args.rows:,} x {DIM} float16 (synthetic), {new['n_test']:,} test rows of "
          f"{new['n_test_patients']:,} patients; built in {new['build_s']:.1f} s")
    print(f"sweep: shots {','.join(map(str, SHOTS))} x {args.seeds} seeds x heads "
          f"{','.join(HEADS)}; {args.bootstrap} patient resamples (ci={new['ci']}); each "
          "sweep in its own process, one after the other")
    if old:
        report(f"old code ({args.baseline})", old)
    report("new code", new)
    report_floor(new, {threads: measure_floor(threads, new["n_test"]) for threads in (1, 2)})
    if old:
        print(f"ratio old / new: wall {old['wall_s'] / new['wall_s']:.2f}x, CPU "
              f"{old['cpu_s'] / new['cpu_s']:.2f}x")
    target_wall, target_cpu = (10, 20) if args.rows == N_ROWS else (5, None)
    print(f"targets: wall < {target_wall} s: {'OK' if new['wall_s'] < target_wall else 'MISSED'}"
          + (f"; CPU < {target_cpu} s: {'OK' if new['cpu_s'] < target_cpu else 'MISSED'}"
             if target_cpu else ""))
    before = {(r["head"], r["shots"]): r for r in old["summary"]} if old else {}
    worst: dict[str, float] = defaultdict(float)
    for row in new["summary"]:
        was = before.get((row["head"], row["shots"]))
        diff = "" if was is None else f"  old {was['mean']:.4f}  diff {row['mean'] - was['mean']:+.4f}"
        if was is not None:
            worst[row["head"]] = max(worst[row["head"]], abs(row["mean"] - was["mean"]))
        print(f"    {row['head']:8s} {row['shots']:2d} shots: mean AUC {row['mean']:.4f} +- "
              f"{row['std']:.4f}  [{row['ci_low']:.4f}, {row['ci_high']:.4f}]{diff}")
    if worst:
        print("largest |new - old| mean AUC per head (same seeds): "
              + ", ".join(f"{h} {d:.4f}" for h, d in worst.items()))

    if args.no_paper:
        return
    if args.forward_ms is None:
        fwd = measure_forward(args.forward_batch)
        forward_ms, how = fwd["ms_per_image"], (f"measured: open_clip ViT-B-32, pretrained=None, "
                                                f"fp32, CPU, batch {fwd['batch']}, best of 3, "
                                                f"{fwd['threads']} threads")
    else:
        forward_ms, how = args.forward_ms, "given with --forward-ms"
    draws = len(SHOTS) * args.seeds
    paper_s = draws * new["n_test"] * forward_ms / 1000
    print(f"encoder forward: {forward_ms:.1f} ms/image ({how})")
    print(f"paper's approach (test set re-encoded once per draw, {draws} draws, shots' own "
          f"passes not counted): {paper_s:,.0f} s = {paper_s / 3600:.1f} h")
    print(f"ratio paper / cached-vector sweep: {paper_s / new['wall_s']:,.0f}x")


if __name__ == "__main__":
    main()
