"""The whole method end to end, in one call: ``cxrembed demo``.

By default, on any laptop with no GPU and no internet: a synthetic NIH twin is written,
the tiny architecture is adapted for a few epochs, the twin is encoded twice (frozen and
adapted encoder), and every protocol runs on the cached vectors: text zero-shot, the
adapted head, the few-shot sweep, similarity search; then the HTML report.

With ``data=/path/to/NIH, model="ViT-B-32", pretrained="openai"`` the same pipeline runs
for real, with the paper's settings (a GPU is needed for the adaptation to finish in
reasonable time).

Layout of the output folder (``cxrembed report`` scans it)::

    summary.json            what ran, how long, the dataset, each protocol's AUCs, searches
    nih-twin/               the synthetic data (demo mode only)
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
from cxrembed.device import resolve_device
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo runs. Defaults: the synthetic twin and the tiny model on a CPU."""

    data: str | None = None  # an NIH folder; None: write a synthetic twin
    # How to read ``data``: the options of every data command (see cxrembed.data.load_nih).
    csv: str | None = None  # metadata CSV kept elsewhere
    train_val_list: str | None = None
    test_list: str | None = None
    view: str = "all"
    # None: 0.25 on the twin, 0.1 (the paper's) on real data. The twin's val split at 10%
    # is ~130 images with 1 positive of several classes: its mean AUC moves by several
    # points from noise alone.
    val_fraction: float | None = None
    split_seed: int = 7
    allow_missing: bool = False  # continue with the images on disk (a partial download)
    images: int = 2000  # twin size
    size: int = 128  # twin PNG side
    seed: int = 0  # twin seed
    model: str = "cxr-tiny"
    pretrained: str = "none"
    # The tiny model starts from random weights, so its encoder needs larger steps than
    # the paper's 1e-5 for pretrained CLIP, and all 4 of its blocks (the paper: top 3 of
    # 12); real runs (model != cxr-tiny) use the paper's settings. Measured on the default
    # twin (see tests/test_demo.py): with the head 10x faster than the encoder (the
    # earlier 3e-3 / 1e-2) the head fits the random features at once, val AUC peaks at
    # epoch 1 and falls, and the store keeps the random encoder's near-identical vectors
    # (mean pairwise cosine 0.996, as the frozen one); with the encoder 10x faster than the
    # head (1e-3 / 1e-4) the encoder has to carry the signal, its vectors spread out
    # and val AUC climbs for several epochs.
    epochs: int = 10
    lr_encoder: float | None = None
    lr_head: float | None = None
    unfreeze: int | None = None
    batch_size: int = 32
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 10
    heads: tuple[str, ...] = ("mlp", "linear", "knn", "tip", "zeroshot")
    searches: int = 3
    device: str = "auto"
    workers: int | None = None  # image-reading processes; None: 0 on a CPU, 4 on a GPU

    @property
    def synthetic(self) -> bool:
        return self.data is None

    @property
    def split_val_fraction(self) -> float:
        """Share of train_val patients held out for val (0.25 on the twin, else 0.1)."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.25 if self.synthetic else 0.1

    def data_flags(self) -> str:
        """The data options as `cxrembed` flags, for the commands the demo shows."""
        flags = [f"--{name.replace('_', '-')} {value}" for name, value in (
            ("csv", self.csv), ("train_val_list", self.train_val_list),
            ("test_list", self.test_list)) if value is not None]
        defaults = DemoConfig()
        flags += [f"--{name.replace('_', '-')} {getattr(self, name)}"
                  for name in ("view", "split_seed")
                  if getattr(self, name) != getattr(defaults, name)]
        if self.split_val_fraction != 0.1:  # the data commands' default
            flags.append(f"--val-fraction {self.split_val_fraction}")
        return " ".join(flags + (["--allow-missing"] if self.allow_missing else []))

    def load_data(self, folder: str | os.PathLike) -> Any:
        """The dataset the demo runs on, read with these data options."""
        from cxrembed.data import load_nih

        return load_nih(folder, csv_path=self.csv, train_val_list=self.train_val_list,
                        test_list=self.test_list, view=self.view,
                        val_fraction=self.split_val_fraction, seed=self.split_seed,
                        missing="drop" if self.allow_missing else "error")

    def adapt_overrides(self, device: str) -> dict[str, Any]:
        tiny = self.model == "cxr-tiny"
        # On a CPU the reading processes only compete with training for the same cores.
        workers = self.workers if self.workers is not None else (0 if device == "cpu" else 4)
        return {
            "model": self.model, "pretrained": self.pretrained, "epochs": self.epochs,
            "batch_size": self.batch_size, "workers": workers,
            "lr_encoder": self.lr_encoder if self.lr_encoder is not None else
            (1e-3 if tiny else 1e-5),
            "lr_head": self.lr_head if self.lr_head is not None else 1e-4,
            "unfreeze": self.unfreeze if self.unfreeze is not None else (4 if tiny else 3),
            "val_fraction": self.split_val_fraction,
        }


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
    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.data.cache import build_pixel_cache
    from cxrembed.encode import encode_dataset
    from cxrembed.fewshot import evaluate_adapted_head, evaluate_zeroshot, run_fewshot
    from cxrembed.model import load_encoder

    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(config.device))
    steps = _Steps(announce, _previous_step_times(out))
    started = time.perf_counter()

    # 1. data
    if config.synthetic:
        from cxrembed.data.synth import make_twin

        data = out / "nih-twin"
        if not (data / "Data_Entry_2017.csv").exists():
            steps.run("synthetic NIH twin",
                      f"cxrembed synth {data} --images {config.images} --size {config.size} "
                      f"--seed {config.seed}",
                      lambda: make_twin(data, images=config.images, size=config.size,
                                        seed=config.seed))
    else:
        data = Path(config.data)
    dataset = config.load_data(data)
    given = config.data_flags()
    data_args = f"{data} {given}" if given else str(data)
    pixels = out / "pixels.h5"
    steps.run("pixel cache", f"cxrembed cache {data_args} --out {pixels}",
              lambda: build_pixel_cache(dataset, pixels, progress=progress),
              reused=_complete_h5(pixels))

    # 2. adaptation (resumes a finished or interrupted run in place)
    overrides = config.adapt_overrides(device)
    # The run records the data options it was given, as `cxrembed adapt` would.
    adapt_config = AdaptConfig.from_dict({
        **overrides, "view": config.view, "val_fraction": config.split_val_fraction,
        "split_seed": config.split_seed, "allow_missing": config.allow_missing})
    # --val-fraction is among the data options already (data_args): not twice.
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()
                     if k != "val_fraction")
    run_dir = out / "adapt"
    result = steps.run("domain adaptation", f"cxrembed adapt {data_args} --out {run_dir} "
                       f"--pixel-cache {pixels} {flags}",
                       lambda: adapt(dataset, run_dir, adapt_config, pixel_cache=pixels,
                                     resume=run_dir.exists(), device=device, progress=progress),
                       reused=(run_dir / "summary.json").is_file())
    if result.stop_reason:
        steps.announce(f"    adaptation {result.stop_reason}")

    # 3. encode twice: the frozen encoder and the adapted one
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

    # 4. protocols on cached vectors
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
            "per_class": [record["auc"][c] for c in LABELS], "mean": record["mean_auc"],
            "ci": _mean_ci(record), "description": description,
            "ci_level": ((record.get("ci") or {}).get("bootstrap") or {}).get("level"),
            "source": f"eval/{slug}.json"}

    shots = ",".join(map(str, config.shots))
    fewshot = steps.run(
        "few-shot sweep",
        f"cxrembed fewshot {stores['adapted']} --shots {shots} --seeds {config.seeds} "
        f"--heads {','.join(config.heads)} --out {out / 'fewshot'}",
        lambda: run_fewshot(stores["adapted"], out=out / "fewshot", shots=config.shots,
                            seeds=config.seeds, heads=config.heads, progress=progress))
    curves = _fewshot_curves(fewshot.summary, config.seeds)
    # Every trained head at the largest shot count: none is picked by its test AUC.
    top = max(config.shots)
    for head in (h for h in curves if curves[h]["shots"][-1] > 0):
        row = fewshot.cell(head, top)
        protocols[f"few-shot {head}, {top}-shot"] = {
            "per_class": [row["per_class"][c]["mean"] for c in LABELS],
            "mean": row["mean_auc"]["mean"], "ci": _row_ci(row),
            "ci_level": fewshot.config.level,
            "description": f"{head} head on {top} shots per class from train, mean over "
                           f"{config.seeds} draws",
            "source": "fewshot/fewshot.json"}

    # 5. searches and report inputs
    searches, thumbs = steps.run("similarity search", f"cxrembed search {stores['adapted']} "
                                 "--id <image> -k 5 --exclude-same-patient --montage ...",
                                 lambda: _searches(stores["adapted"], dataset, out,
                                                   config.searches, pixels))
    (out / "thumbnails.json").write_text(json.dumps(thumbs))

    summary = {
        "format": "cxrembed.demo",
        "title": "cxrembed demo" + (" (synthetic NIH twin, tiny model, CPU)"
                                    if config.synthetic else f" ({data})"),
        "description": ("Synthetic data and a randomly initialised tiny CLIP: these numbers "
                        "show that the pipeline works and learns, not what CLIP achieves on "
                        "real chest X-rays." if config.synthetic else
                        "The paper's pipeline on a real NIH ChestX-ray14 folder."),
        "created": dt.datetime.now().isoformat(timespec="seconds"), "version": __version__,
        "config": {k: v for k, v in config.__dict__.items()}, "device": device,
        "dataset": dataset.summary(), "adapt_run": "adapt", "steps": steps.records,
        "adapt": result.to_dict() | {"history": None},
        "protocols": protocols, "searches": searches, "thumbnails": "thumbnails.json",
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    from cxrembed.report import write_report

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
    with_findings = test[dataset.labels[test].sum(axis=1) > 0]
    queries = rng.choice(with_findings, size=min(count, len(with_findings)), replace=False)
    records, needed = [], {}
    for row in queries:
        image_id = str(dataset.image_id[row])
        hits = search(store_path, image_id=image_id, k=5, split="train",
                      exclude_same_patient=True,
                      montage=out / "search" / f"{image_id.removesuffix('.png')}.png")
        labels = [LABELS[k] for k in np.flatnonzero(dataset.labels[row])]
        records.append({
            "title": f"test image {image_id}: its 5 nearest train images of other patients",
            "query": {"image_id": image_id, "labels": labels},
            "neighbours": [h.to_dict() for h in hits],
            "centring": hits.centring.to_dict(),
            "montage": f"search/{image_id.removesuffix('.png')}.png"})
        needed[image_id] = row
        for h in hits:
            needed[h.image_id] = int(np.flatnonzero(dataset.image_id == h.image_id)[0])
    source = ImageSource(dataset, pixels)
    ids = list(needed)
    images = source.read(np.array([needed[i] for i in ids]))
    return records, thumbnails(dict(zip(ids, images)))


def check_config(config: DemoConfig) -> None:
    """ConfigError for values the demo cannot run with."""
    if config.data is not None and not Path(config.data).is_dir():
        raise ConfigError(f"--data {config.data} is not a folder; give an NIH ChestX-ray14 "
                          "folder, or leave --data out to use the synthetic twin")
    files = [f"--{name.replace('_', '-')}" for name in ("csv", "train_val_list", "test_list")
             if getattr(config, name) is not None]
    if config.data is None and files:
        raise ConfigError(f"{', '.join(files)} describe a real NIH folder: pass it with --data "
                          "(the synthetic twin has its own files)")
    if config.epochs < 1 or config.seeds < 1:
        raise ConfigError("--epochs and --seeds must be at least 1")
