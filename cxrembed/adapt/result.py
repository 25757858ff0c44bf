"""What a run tells its caller: once set up (:class:`AdaptStart`) and at the end
(:class:`AdaptResult`, also RUN/summary.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdaptStart:
    """What was set up, passed to ``adapt(on_start=...)`` before the first step."""

    model: str
    weights: str  # in words, e.g. "random init (no pretrained weights)"
    device: str
    trainable_params: int
    unfreeze: int
    epochs_done: int  # > 0 when resuming
    epochs: int
    workers: int  # image-reading processes actually used
    train: int  # images per split
    val: int
    test: int
    processes: int = 1  # torchrun processes training together (WORLD_SIZE)


@dataclass
class AdaptResult:
    """What a run ended with (also written to RUN/summary.json)."""

    out: Path
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    trainable_params: int
    val_auc: dict[str, float | None]  # at the best epoch; None where undefined
    val_mean_auc: float
    test_auc: dict[str, float | None]
    test_mean_auc: float | None
    undefined: dict[str, list[str]]  # split -> classes without positives or negatives
    history: list[dict] = field(default_factory=list)
    #: "stopped early at epoch 6 of 10: no val AUC gain for 5 epochs ..." or None.
    stop_reason: str | None = None
    epochs: int | None = None  # the configured maximum
    #: the head's classes (the dataset's own, in order) and the collection they come from;
    #: None in a summary written before cxrembed recorded them (NIH's 14)
    label_names: list[str] | None = None
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out

    @classmethod
    def from_summary(cls, run_dir: Path) -> "AdaptResult":
        """The result of a finished run, read back from its summary.json."""
        values = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
        values["out"] = Path(values["out"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
