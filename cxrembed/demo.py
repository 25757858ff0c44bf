"""The whole method end to end, in one call: ``cxrembed demo``.

By default, on any laptop with no GPU and no internet: a synthetic NIH twin is written,
the tiny architecture is adapted for a few epochs, the twin is encoded twice (frozen and
adapted encoder), and every protocol runs on the cached vectors: text zero-shot, the
adapted head, the few-shot sweep, similarity search; then the HTML report.

With ``data=/path/to/NIH, model="ViT-B-32", pretrained="openai"`` the same pipeline runs
for real, with the paper's settings (a GPU is needed for the adaptation to finish in
reasonable time). ``data`` may be any collection the readers take (CheXpert, MIMIC-CXR-JPG,
PadChest, a labelled CSV, class folders: ``DemoConfig.data_options``); the head, the
protocols and the report then use that collection's own classes.

Layout of the output folder (``cxrembed report`` scans it)::

    summary.json            what ran, how long, the dataset, each protocol's AUCs, searches
    nih-twin/               the synthetic data (synthetic mode only)
    pixels.h5               the pixel cache
    adapt/                  the adaptation run (config.json, metrics.jsonl, summary.json,
                            model.safetensors, model.json, state/)
    store-frozen.h5/.faiss  the frozen encoder's store
    store-adapted.h5/.faiss the adapted encoder's store
    eval/*.json             zero-shot (frozen, adapted) and adapted-head results
    fewshot/                the sweep (fewshot.json, CSVs, config.json, plot)
    search/*.png            montages of a few searches
    thumbnails.json         the searched images as small PNGs, for the report
    report.html
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrembed import __version__
from cxrembed.demo_config import DemoConfig, check_config
from cxrembed.device import resolve_device

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "DemoResult", "check_config", "format_step_time", "run_demo"]


@dataclass
class DemoResult:
    out: Path
    report: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


class _Steps:
    """Times each step and records the CLI command that does the same thing.

    A step whose output a previous run of the demo left complete is *reused*: it takes no
    time now, so its record says so (``reused``) and keeps the time it took when it ran
    (``original_seconds``, when the previous summary.json has it).
    """

    def __init__(self, announce: Callable[[str], None] | None,
                 previous: dict[str, float] | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.announce = announce or (lambda _msg: None)
        self.previous = previous or {}

    def run(self, name: str, command: str, fn: Callable[[], Any], reused: bool = False) -> Any:
        self.announce(f"[{len(self.records) + 1}] {name}: {command}"
                      + (" (reusing the previous run's output)" if reused else ""))
        start = time.perf_counter()
        value = fn()
        record = {"name": name, "command": command,
                  "seconds": round(time.perf_counter() - start, 2), "reused": reused}
        if reused:
            record["original_seconds"] = self.previous.get(name)
        self.records.append(record)
        return value


def format_step_time(step: dict[str, Any]) -> str:
    """``12.3 s``, or for a reused step ``reused (12.3 s when run)`` / ``reused``."""
    if not step.get("reused"):
        return f"{step['seconds']:.1f} s"
    original = step.get("original_seconds")
    return "reused" if original is None else f"reused ({original:.1f} s when run)"


def _previous_step_times(out: Path) -> dict[str, float]:
    """Step name -> seconds it took when it last really ran, from a previous summary.json."""
    try:
        steps = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("steps", [])
    except (OSError, ValueError):
        return {}
    times = {}
    for step in steps:
        seconds = step.get("original_seconds") if step.get("reused") else step.get("seconds")
        if isinstance(seconds, (int, float)):
            times[step["name"]] = seconds
    return times


def _complete_h5(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file (pixel cache or store) marked complete."""
    if not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


def run_demo(out: str | os.PathLike = "cxrembed-demo", config: DemoConfig | None = None, *,
             progress: bool = True, announce: Callable[[str], None] | None = None
             ) -> DemoResult:
    """Run the pipeline into ``out`` and write its report; see the module docstring.

    ``announce`` receives one line per step (the CLI prints them); the library itself
    prints nothing.
    """
    from cxrembed.data.cache import build_pixel_cache

    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(config.device))
    steps = _Steps(announce, _previous_step_times(out))
    started = time.perf_counter()
    data = _data_step(out, config, steps)  # 1. data (the pixel cache too)
    dataset = config.load_data(data)
    given = config.data_flags()
    data_args = f"{data} {given}" if given else str(data)
    pixels = out / "pixels.h5"
    steps.run("pixel cache", f"cxrembed cache {data_args} --out {pixels}",
              lambda: build_pixel_cache(dataset, pixels, progress=progress),
              reused=_complete_h5(pixels))
    run_dir = out / "adapt"  # 2. adaptation
    result = _adapt_step(run_dir, config, steps, dataset, data_args, pixels, device, progress)
    # 3. encode twice: the frozen encoder and the adapted one
    stores = _encode_steps(out, config, steps, dataset, data_args, pixels, run_dir, device,
                           progress)
    protocols = _eval_steps(out, steps, stores)  # 4. protocols on cached vectors
    protocols.update(_fewshot_step(out, config, steps, stores["adapted"], progress))
    # 5. searches and report inputs
    searches, thumbs = steps.run("similarity search", f"cxrembed search {stores['adapted']} "
                                 "--id <image> -k 5 --exclude-same-patient --montage ...",
                                 lambda: _searches(stores["adapted"], dataset, out,
                                                   config.searches, pixels))
    (out / "thumbnails.json").write_text(json.dumps(thumbs))
    summary = _summary(config, data, dataset, device, steps, result, protocols, searches)
    return _write_summary_and_report(out, steps, summary, started, protocols)


def _data_step(out: Path, config: DemoConfig, steps: _Steps) -> Path:
    """The data folder: ``config.data``, or a synthetic twin written into ``out``."""
    if not config.synthetic:
        return Path(config.data)
    from cxrembed.data.synth import make_twin

    data = out / "nih-twin"
    if not (data / "Data_Entry_2017.csv").exists():
        steps.run("synthetic NIH twin",
                  f"cxrembed synth {data} --images {config.images} --size {config.size} "
                  f"--seed {config.seed}",
                  lambda: make_twin(data, images=config.images, size=config.size,
                                    seed=config.seed))
    return data


def _adapt_step(run_dir: Path, config: DemoConfig, steps: _Steps, dataset: Any,
                data_args: str, pixels: Path, device: str, progress: bool) -> Any:
    """The adaptation run (resumes a finished or interrupted run in place); the head is
    sized from the dataset's label set, unknown labels masked."""
    from cxrembed.adapt import AdaptConfig, adapt

    overrides = config.adapt_overrides(device)
    # The run records the data options it was given, as `cxrembed adapt` would.
    adapt_config = AdaptConfig.from_dict({
        **overrides, "view": config.view, "val_fraction": config.split_val_fraction,
        "split_seed": config.split_seed, "allow_missing": config.allow_missing})
    # --val-fraction is among the data options already (data_args): not twice.
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()
                     if k != "val_fraction")
    result = steps.run("domain adaptation", f"cxrembed adapt {data_args} --out {run_dir} "
                       f"--pixel-cache {pixels} {flags}",
                       lambda: adapt(dataset, run_dir, adapt_config, pixel_cache=pixels,
                                     resume=run_dir.exists(), device=device, progress=progress,
                                     data_options=config.reader_options),
                       reused=(run_dir / "summary.json").is_file())
    if result.stop_reason:
        steps.announce(f"    adaptation {result.stop_reason}")
    return result


def _encode_steps(out: Path, config: DemoConfig, steps: _Steps, dataset: Any, data_args: str,
                  pixels: Path, run_dir: Path, device: str, progress: bool
                  ) -> dict[str, Path]:
    """The frozen and the adapted encoder's stores (``frozen`` / ``adapted`` -> path)."""
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    stores = {"frozen": out / "store-frozen.h5", "adapted": out / "store-adapted.h5"}
    frozen = load_encoder(config.model, config.pretrained, device=device)
    steps.run("encode (frozen CLIP)", f"cxrembed encode {data_args} --out {stores['frozen']} "
              f"--model {config.model} --pretrained {config.pretrained} --pixel-cache {pixels}",
              lambda: encode_dataset(dataset, stores["frozen"], frozen, pixel_cache=pixels,
                                     resume=True, progress=progress),
              reused=_complete_h5(stores["frozen"]))
    adapted = load_encoder(checkpoint=run_dir, device=device)
    steps.run("encode (adapted)", f"cxrembed encode {data_args} --out {stores['adapted']} "
              f"--checkpoint {run_dir} --pixel-cache {pixels}",
              lambda: encode_dataset(dataset, stores["adapted"], adapted, pixel_cache=pixels,
                                     resume=True, progress=progress),
              reused=_complete_h5(stores["adapted"]))
    return stores


def _eval_steps(out: Path, steps: _Steps, stores: dict[str, Path]) -> dict[str, dict]:
    """Text zero-shot on both stores and the adapted head, each saved under ``eval/``."""
    from cxrembed.fewshot import evaluate_adapted_head, evaluate_zeroshot

    evals = {
        "zero-shot (frozen CLIP)": ("cxrembed zeroshot", stores["frozen"], evaluate_zeroshot,
                                    "text prompts, CheXzero-style softmax over a positive and a "
                                    "negative prompt, on the frozen encoder: true zero-shot"),
        "zero-shot (adapted)": ("cxrembed zeroshot", stores["adapted"], evaluate_zeroshot,
                                "the same prompts on the adapted encoder (its text tower was "
                                "never trained, so this tests how far adaptation moves the image "
                                "space away from the text space)"),
        "adapted head": ("cxrembed evaluate --head adapted", stores["adapted"],
                         evaluate_adapted_head,
                         "the adapted model's own supervised head: the figure the paper calls "
                         "'zero-shot' (0.7502)"),
    }
    protocols: dict[str, dict[str, Any]] = {}
    (out / "eval").mkdir(exist_ok=True)
    for name, (cmd, store, fn, description) in evals.items():
        res = steps.run(name, f"{cmd} {store}", lambda fn=fn, store=store: fn(store))
        slug = name.replace(" ", "-").replace("(", "").replace(")", "")
        res.save(out / "eval" / f"{slug}.json")
        record = res.to_dict()
        protocols[name] = {
            "labels": list(record["auc"]),
            "per_class": list(record["auc"].values()), "mean": record["mean_auc"],
            "ci": _mean_ci(record), "description": description,
            "ci_level": ((record.get("ci") or {}).get("bootstrap") or {}).get("level"),
            "source": f"eval/{slug}.json"}
    return protocols


def _fewshot_step(out: Path, config: DemoConfig, steps: _Steps, store: Path,
                  progress: bool) -> dict[str, dict]:
    """The few-shot sweep on ``store``; returns every trained head's row at the largest shot
    count (none is picked by its test AUC)."""
    from cxrembed.fewshot import run_fewshot

    shots = ",".join(map(str, config.shots))
    fewshot = steps.run(
        "few-shot sweep",
        f"cxrembed fewshot {store} --shots {shots} --seeds {config.seeds} "
        f"--heads {','.join(config.heads)} --out {out / 'fewshot'}",
        lambda: run_fewshot(store, out=out / "fewshot", shots=config.shots,
                            seeds=config.seeds, heads=config.heads, progress=progress))
    curves = _fewshot_curves(fewshot.summary, config.seeds)
    top = max(config.shots)
    protocols = {}
    for head in (h for h in curves if curves[h]["shots"][-1] > 0):
        row = fewshot.cell(head, top)
        protocols[f"few-shot {head}, {top}-shot"] = {
            "labels": list(row["per_class"]),
            "per_class": [cell["mean"] for cell in row["per_class"].values()],
            "mean": row["mean_auc"]["mean"], "ci": _row_ci(row),
            "ci_level": fewshot.config.level,
            "description": f"{head} head on {top} shots per class from train, mean over "
                           f"{config.seeds} draws",
            "source": "fewshot/fewshot.json"}
    return protocols


def _summary(config: DemoConfig, data: Path, dataset: Any, device: str, steps: _Steps,
             result: Any, protocols: dict, searches: list[dict]) -> dict[str, Any]:
    """summary.json's content (its ``seconds`` are set when it is written)."""
    return {
        "format": "cxrembed.demo",
        "title": "cxrembed demo" + (" (synthetic NIH twin, tiny model, CPU)"
                                    if config.synthetic else f" ({data}, {dataset.dataset})"),
        "description": ("Synthetic data and a randomly initialised tiny CLIP: these numbers "
                        "show that the pipeline works and learns, not what CLIP achieves on "
                        "real chest X-rays." if config.synthetic else
                        f"The paper's pipeline on {data} (read as {dataset.dataset}: "
                        f"{len(dataset.label_names)} classes of its own)."),
        "created": dt.datetime.now().isoformat(timespec="seconds"), "version": __version__,
        "config": {k: v for k, v in config.__dict__.items()}, "device": device,
        "dataset": dataset.summary(), "adapt_run": "adapt", "steps": steps.records,
        "adapt": result.to_dict() | {"history": None},
        "protocols": protocols, "searches": searches, "thumbnails": "thumbnails.json",
    }


def _write_summary_and_report(out: Path, steps: _Steps, summary: dict[str, Any],
                              started: float, protocols: dict) -> DemoResult:
    """summary.json, then the report, then both again so the report lists its own step."""
    from cxrembed.report import write_report

    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report = steps.run("HTML report", f"cxrembed report {out}", lambda: write_report(out).path)
    summary["steps"] = steps.records
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(out)  # once more, so the report lists its own step too
    return DemoResult(out=out, report=report, steps=steps.records, protocols=protocols,
                      seconds=summary["seconds"])


def _mean_ci(record: dict) -> list[float] | None:
    """[low, high] of the mean AUC of an evaluation record, when it was bootstrapped."""
    mean = (record.get("ci") or {}).get("mean_auc") or {}
    lo, hi = mean.get("low"), mean.get("high")
    return [lo, hi] if lo is not None and hi is not None else None


def _row_ci(row: dict) -> list[float] | None:
    """[low, high] of the seed-mean AUC of a few-shot summary row."""
    lo, hi = row["mean_auc"].get("ci_low"), row["mean_auc"].get("ci_high")
    return [lo, hi] if lo is not None and hi is not None else None


def _fewshot_curves(summary: list[dict], seeds: int) -> dict[str, dict[str, list]]:
    """head -> shots, mean and std of the mean AUC over seeds (training-free heads: flat)."""
    curves: dict[str, dict[str, list]] = {}
    for row in sorted(summary, key=lambda r: (r["head"], r["shots"])):
        c = curves.setdefault(row["head"], {"shots": [], "mean": [], "std": []})
        c["shots"].append(row["shots"])
        c["mean"].append(row["mean_auc"]["mean"])
        c["std"].append(row["mean_auc"]["std"] or 0.0)
    return curves


def _searches(store_path: Path, dataset: Any, out: Path, count: int, pixels: Path
              ) -> tuple[list[dict], dict[str, str]]:
    """A few test images with findings as queries; neighbours among train images."""
    from cxrembed.data.cache import ImageSource
    from cxrembed.report import thumbnails
    from cxrembed.search import search

    (out / "search").mkdir(exist_ok=True)
    test = dataset.split_rows("test")
    rng = np.random.default_rng(0)
    positive = dataset.labels & dataset.label_known  # known findings only
    with_findings = test[positive[test].sum(axis=1) > 0]
    queries = rng.choice(with_findings, size=min(count, len(with_findings)), replace=False)
    records, needed = [], {}
    for row in queries:
        image_id = str(dataset.image_id[row])
        montage = f"search/{_file_stem(image_id)}.png"
        hits = search(store_path, image_id=image_id, k=5, split="train",
                      exclude_same_patient=True, montage=out / montage)
        labels = [dataset.label_names[k] for k in np.flatnonzero(positive[row])]
        records.append({
            "title": f"test image {image_id}: its 5 nearest train images of other patients",
            "query": {"image_id": image_id, "labels": labels},
            "neighbours": [h.to_dict() for h in hits],
            "centring": hits.centring.to_dict(), "montage": montage})
        needed[image_id] = row
        for h in hits:
            needed[h.image_id] = int(np.flatnonzero(dataset.image_id == h.image_id)[0])
    source = ImageSource(dataset, pixels)
    ids = list(needed)
    images = source.read(np.array([needed[i] for i in ids]))
    return records, thumbnails(dict(zip(ids, images)))


def _file_stem(image_id: str) -> str:
    """A file name for an image id (a CSV's or a class folder's id is a relative path):
    ``Pneumonia/p1.png`` -> ``Pneumonia_p1``, ``00000001_000.png`` -> ``00000001_000``."""
    stem = os.path.splitext(image_id)[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
