"""The report's figures, drawn with matplotlib's object API (``Figure`` and
``FigureCanvasAgg``: no pyplot, no global backend switch) and embedded as PNG data URIs."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise ConfigError("the report's figures need matplotlib: pip install matplotlib") \
            from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, list(np.atleast_1d(axes))


def png_uri(fig: Any) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def adaptation_curves(history: list[dict[str, Any]]) -> str:
    """Train loss, and val AUC per class (grey) and mean, by epoch."""
    fig, (ax1, ax2) = _figure(10, 3.4, ncols=2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h.get("train_loss") for h in history], "o-", color="#2b6cb0")
    ax1.set(xlabel="epoch", ylabel="train loss (focal BCE)", title="training loss")
    names = list(dict.fromkeys(c for h in history for c in (h.get("val_auc") or {})))
    per_class = np.array([[np.nan if (h.get("val_auc") or {}).get(c) is None
                           else h["val_auc"][c] for c in names] for h in history], dtype=float)
    per_class = per_class.reshape(len(history), len(names))
    for k in range(per_class.shape[1]):
        ax2.plot(epochs, per_class[:, k], color="#a0aec0", lw=0.8)
    ax2.plot(epochs, [h.get("val_mean_auc") for h in history], "o-", color="#c05621", lw=2.5,
             label="mean (defined classes)")
    ax2.set(xlabel="epoch", ylabel="val AUC", title="validation AUC per class (grey) and mean")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_uri(fig)


def fewshot_curves(summary: list[dict[str, Any]], paper: dict[int, float], title: str) -> str:
    """Mean AUC against shots per head (+- std over seeds), training-free heads drawn flat,
    and the paper's published few-shot means."""
    fig, (ax,) = _figure(7, 4)
    heads = list(dict.fromkeys(row["head"] for row in summary))
    shots = sorted({row["shots"] for row in summary if row["shots"] > 0}) or [1]
    for i, head in enumerate(heads):
        rows = sorted((r for r in summary if r["head"] == head), key=lambda r: r["shots"])
        mean = np.array([r["mean_auc"]["mean"] for r in rows], dtype=float)
        std = np.array([r["mean_auc"]["std"] or 0.0 for r in rows], dtype=float)
        if rows[-1]["shots"] == 0:  # training-free: one value, drawn across
            label = ("adapted head (full supervision)" if head == "adapted"
                     else f"{head} (0-shot)")
            ax.hlines(mean[0], shots[0], shots[-1], linestyles=":", colors=f"C{i}", label=label)
            continue
        x = np.array([r["shots"] for r in rows], dtype=float)
        ax.plot(x, mean, "o-", color=f"C{i}", label=head)
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
    published = sorted((k, v) for k, v in paper.items() if k > 0)
    if published:
        ax.plot(*zip(*published), "k--", lw=1, label="paper (published)")
        shots = sorted(set(shots) | {k for k, _ in published})
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set(xlabel="shots per class", ylabel="mean test AUC (over classes)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_uri(fig)


def roc_curves(classes: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> str:
    """One ROC curve per (class name, 0/1 labels, scores) with both outcomes present."""
    from matplotlib import colormaps
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure(6.5, 5.5)
    cmap = colormaps["tab20"]
    for k, (name, y, scores) in enumerate(classes):
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores)
            ax.plot(fpr, tpr, color=cmap(k % 20), lw=1.2, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return png_uri(fig)


def reliability_diagram(before: dict[str, list], after: dict[str, list], title: str) -> str:
    """Observed frequency against mean predicted probability per bin (pooled over classes),
    the head's own probabilities and the calibrated ones; marker area ~ images in the bin."""
    fig, (ax,) = _figure(5.5, 5.0)
    for points, label, colour in ((before, "uncalibrated", "tab:red"),
                                  (after, "calibrated on val", "tab:blue")):
        if points["count"]:
            size = 8 + 200 * np.asarray(points["count"]) / max(sum(points["count"]), 1)
            ax.plot(points["confidence"], points["frequency"], "-", color=colour, lw=1)
            ax.scatter(points["confidence"], points["frequency"], s=size, color=colour,
                       label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="upper left")
    return png_uri(fig)
