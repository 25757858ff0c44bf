"""A sweep's result and its files: JSON, two CSV tables, the config, and the plot.

Files written by :meth:`FewShotResult.save` into ``OUT``:

* ``fewshot.json``: everything (config, source, summary, every run, every sample drawn,
  timing); :func:`load_result` reads it back.
* ``fewshot_auc.csv``: one row per head, shots, seed and class (``mean`` = macro mean).
* ``fewshot_summary.csv``: one row per head, shots and class: n_seeds, mean, std over
  seeds, bootstrap ci_low / ci_high.
* ``config.json``: the :class:`~cxrembed.fewshot.config.FewShotConfig` used.
* ``fewshot_mean_auc.png``: mean AUC against shots per head, +- std shaded, CI bars.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.fewshot.config import FewShotConfig
from cxrembed.labels import LABELS

RESULT_FORMAT = "cxrembed.fewshot"


def json_number(x: float | None) -> float | None:
    """A float for JSON; NaN (undefined) becomes null."""
    return None if x is None or np.isnan(x) else float(x)


def eval_set(split: str, image_id: np.ndarray | None, rows: np.ndarray) -> dict[str, Any]:
    """Which images a result was scored on: split, count, and a SHA-256 of the sorted image
    ids (None when the data has no ids). ``compare`` refuses to mix results whose sets
    differ."""
    digest = None
    if image_id is not None:
        ids = sorted(str(i) for i in np.asarray(image_id)[rows])
        digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    return {"split": split, "n": int(len(rows)), "ids_sha256": digest}


def per_class_dict(values: np.ndarray, names: Any = None) -> dict[str, float | None]:
    """``{class: value}`` in label order (``names``, default NIH's 14), NaN as null."""
    return {name: json_number(v) for name, v in zip(LABELS if names is None else names,
                                                     values)}


@dataclass
class FewShotResult:
    """Per (head, shots, seed) AUCs, per (head, shots) summaries, the samples drawn."""

    config: FewShotConfig
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    source: dict[str, Any]
    timing: dict[str, Any]
    #: test scores per (head, shots, seed) when asked for (keep_scores=True)
    scores: dict[tuple[str, int, int | None], np.ndarray] | None = None
    #: the classes scored (the store's own label names)
    label_names: tuple[str, ...] = LABELS

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, "format_version": 1, "labels": list(self.label_names),
                "config": dataclasses.asdict(self.config), "source": self.source,
                "summary": self.summary, "runs": self.runs, "samples": self.samples,
                "timing": self.timing}

    def cell(self, head: str, shots: int) -> dict[str, Any]:
        """The summary row of one (head, shots) cell (shots 0 for training-free heads)."""
        for row in self.summary:
            if row["head"] == head and row["shots"] == shots:
                return row
        raise ConfigError(f"no result for head {head!r} at {shots} shots")

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write fewshot.json, fewshot_auc.csv, fewshot_summary.csv, config.json and the
        plot fewshot_mean_auc.png into ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "fewshot.json", "runs_csv": out / "fewshot_auc.csv",
                 "summary_csv": out / "fewshot_summary.csv", "config": out / "config.json",
                 "plot": out / "fewshot_mean_auc.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, default=to_jsonable))
        paths["config"].write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        write_runs_csv(self.runs, paths["runs_csv"])
        write_summary_csv(self.summary, paths["summary_csv"])
        plot_fewshot(self.summary, paths["plot"])
        return paths


def to_jsonable(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_result(path: str | os.PathLike, formats: tuple[str, ...] = (RESULT_FORMAT,)
                ) -> dict[str, Any]:
    """Read a saved result as a dict: a sweep (its fewshot.json or the folder holding it),
    or, when ``formats`` allows, a ``zeroshot``/``evaluate --out`` JSON. The dict gets
    ``_path``, where it was read from."""
    path = Path(path)
    if path.is_dir():
        path = path / "fewshot.json"
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no result at {path}: pass a `cxrembed fewshot --out` folder or its "
                        "fewshot.json" + (", or a JSON written by `zeroshot`/`evaluate --out`"
                                          if len(formats) > 1 else "")) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path} is not a cxrembed result of the kind expected (format "
                        f"{found!r}; expected {' or '.join(formats)})")
    obj["_path"] = str(path)
    return obj


def write_runs_csv(runs: list[dict[str, Any]], path: Path) -> None:
    """Long table: head, shots, seed, class (the 14 and ``mean``), auc."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "shots", "seed", "class", "auc"])
        for run in runs:
            seed = "" if run["seed"] is None else run["seed"]
            for name, auc in run["auc"].items():
                writer.writerow([run["head"], run["shots"], seed, name, _fmt(auc)])
            writer.writerow([run["head"], run["shots"], seed, "mean", _fmt(run["mean_auc"])])


def write_summary_csv(summary: list[dict[str, Any]], path: Path) -> None:
    """head, shots, class, n_seeds, mean, std, ci_low, ci_high (``mean`` = macro mean)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "shots", "class", "n_seeds", "mean", "std", "ci_low",
                         "ci_high"])
        for row in summary:
            items = list(row["per_class"].items()) + [("mean", row["mean_auc"])]
            for name, v in items:
                writer.writerow([row["head"], row["shots"], name, row["n_seeds"],
                                 *(_fmt(v[k]) for k in ("mean", "std", "ci_low", "ci_high"))])


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def plot_fewshot(summary: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Mean AUC against shots per head, +- std over seeds shaded, bootstrap interval as
    error bars; training-free heads as dashed horizontal lines."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    heads = list(dict.fromkeys(row["head"] for row in summary))
    shots_all = sorted({row["shots"] for row in summary if row["shots"] > 0})
    for i, head in enumerate(heads):
        rows = sorted((r for r in summary if r["head"] == head), key=lambda r: r["shots"])
        color = f"C{i}"
        m = [r["mean_auc"] for r in rows]
        if rows[0]["shots"] == 0 and len(rows) == 1:
            label = ("adapted head (full supervision)" if head == "adapted"
                     else f"{head} (0-shot)")
            ax.axhline(m[0]["mean"], color=color, linestyle="--", label=label)
            continue
        x = np.array([r["shots"] for r in rows])
        mean = np.array([v["mean"] for v in m], dtype=float)
        std = np.array([v["std"] or 0.0 for v in m], dtype=float)
        ax.plot(x, mean, marker="o", color=color, label=head)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        low = np.array([np.nan if v["ci_low"] is None else v["ci_low"] for v in m])
        high = np.array([np.nan if v["ci_high"] is None else v["ci_high"] for v in m])
        if np.isfinite(low).all():
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="none", ecolor=color,
                        capsize=3, linewidth=1)
    if shots_all:
        if not ax.has_data() or not np.isfinite(ax.dataLim.bounds).all():
            ax.set_xlim(min(shots_all) / 1.5, max(shots_all) * 1.5)  # every mean undefined
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots_all, [str(k) for k in shots_all])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("mean AUC (test)")
    ax.set_title("Few-shot mean AUC: mean over seeds, +- std shaded, bootstrap CI bars")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
