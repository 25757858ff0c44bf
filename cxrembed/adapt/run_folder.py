"""The run folder of ``adapt``: checked before anything is written, started once the model
is built, resumed from its last committed epoch, finished with the test figures.

Layout (see :mod:`cxrembed.adapt`)::

    RUN/config.json  metrics.jsonl  state/  model.safetensors  model.json  summary.json

A start that fails (unknown model, weights not reachable, unreadable data, a folder
holding another run) fails before the first write: nothing is left behind, and the same
command can be run again once the cause is fixed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrembed import __version__
from cxrembed.adapt.config import AdaptConfig
from cxrembed.adapt.evaluate import auc_dict, auc_report
from cxrembed.adapt.result import AdaptResult
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS

if TYPE_CHECKING:
    from cxrembed.adapt.build import Training
    from cxrembed.model.run_state import RunState

log = logging.getLogger(__name__)


@dataclass
class RunFolder:
    """A checked run folder: ``saved`` is the identity of the run to resume (None for a
    fresh one), ``progress`` its last committed state/progress.json."""

    out: Path
    identity: dict
    saved: dict | None
    progress: dict | None
    overwrite: bool

    @property
    def finished(self) -> bool:
        return bool(self.progress and self.progress.get("complete"))


def check_run_folder(out: Path, config: AdaptConfig, dataset: Any, resume: bool,
                     overwrite: bool, data_options: dict[str, Any] | None = None) -> RunFolder:
    """Refuse a folder holding another run, or this run without ``resume``; read only.

    The identity recorded in ``config.json`` names the collection (``dataset``), its label
    set (``label_names``: the head's outputs, in order) and the reader options given."""
    from cxrembed.model.run_state import check_run_dir, data_identity, read_progress

    identity = {"config": config.to_dict(), "data": data_identity(dataset),
                "data_root": str(dataset.root), "cxrembed_version": __version__,
                "dataset": getattr(dataset, "dataset", "nih"),
                "label_names": list(getattr(dataset, "label_names", None) or LABELS),
                "data_options": dict(data_options or {})}
    saved = check_run_dir(out, identity, resume, overwrite, AdaptConfig.RESUMABLE)
    progress = read_progress(out / "state") if saved is not None else None
    folder = RunFolder(out, identity, saved, progress, overwrite)
    if folder.finished and saved["config"].get("epochs") != config.epochs:
        raise ConfigError(f"{out} is a finished run (its test split has been evaluated); "
                          "training it further would let test results steer it. Start "
                          "a new run with --epochs instead")
    return folder


def begin_run(folder: RunFolder, base_weights: dict, weights_name: str) -> None:
    """The run's first write: a fresh ``config.json``, or the resumed one brought up to
    date (resumable fields such as ``epochs`` may have changed)."""
    from cxrembed.files import atomic_write_text
    from cxrembed.model.run_state import start_run_dir

    if folder.saved is None:
        start_run_dir(folder.out, dict(folder.identity, base_weights=base_weights),
                      folder.overwrite)
        return
    recorded = folder.saved.get("base_weights")
    if recorded is not None and recorded != base_weights:
        raise ConfigError(f"the weights {weights_name} differ from those {folder.out} was "
                          f"started with ({recorded} vs {base_weights}); pass the same file or "
                          "--overwrite")
    saved = dict(folder.saved, config=folder.identity["config"], base_weights=base_weights)
    (folder.out / "state").mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.out / "config.json", json.dumps(saved, indent=2))


def restore_state(folder: RunFolder, training: Training) -> RunState:
    """The state of the last committed epoch (weights, optimizer, scheduler restored in
    place), or a fresh one; metrics lines past that epoch are dropped (by rank 0 only:
    every rank reads the state, one writes)."""
    from cxrembed.model.run_state import RunState, rewrite_metrics

    if folder.progress is None:
        state = RunState.fresh()
    else:
        state = RunState.load(folder.out / "state", folder.progress, training.model,
                              training.optimizer, training.scheduler)
    if training.launch.main:
        rewrite_metrics(folder.out / "metrics.jsonl", state.history)
    return state


def _test_figures(test_labels: np.ndarray | None, test_scores: np.ndarray | None,
                  undefined: list[str], test_known: np.ndarray | None, names: tuple[str, ...]
                  ) -> tuple[dict[str, float | None], float | None]:
    if test_scores is None:
        log.warning("the test split is empty: no test AUC")
        return {name: None for name in names}, None
    aucs, mean, _ = auc_report(test_labels, test_scores, test_known, names)
    if undefined:
        log.warning("test has no positives (or no negatives) among the known labels of %s: "
                    "their AUC is undefined and left out of the mean", ", ".join(undefined))
    return auc_dict(aucs, names), None if math.isnan(mean) else mean


def finish_run(out: Path, training: Training, config: AdaptConfig, base: dict, state: RunState,
               undefined: dict, test_labels: np.ndarray | None,
               test_scores: np.ndarray | None, *, label_names: tuple[str, ...] = LABELS,
               vocabulary: str = "nih", test_known: np.ndarray | None = None
               ) -> AdaptResult:
    """Write the test line, the adapted model (its head's label names and vocabulary in
    model.json), summary.json; mark the state complete."""
    from cxrembed.adapt.loop import early_stop_message
    from cxrembed.model.adapted import save_adapted
    from cxrembed.files import atomic_write_text
    from cxrembed.model.run_state import append_jsonl

    test_auc, test_mean = _test_figures(test_labels, test_scores, undefined["test"],
                                        test_known, tuple(label_names))
    stop_reason = early_stop_message(state, config) if state.stopped_early else None
    append_jsonl(out / "metrics.jsonl", {"split": "test", "best_epoch": state.best_epoch,
                                          "test_auc": test_auc, "test_mean_auc": test_mean,
                                          "stop_reason": stop_reason})
    best = state.history[state.best_epoch - 1]
    result = AdaptResult(out=out, best_epoch=state.best_epoch, epochs_run=state.epochs_done,
                         stopped_early=state.stopped_early,
                         trainable_params=training.trainable_params,
                         val_auc=best["val_auc"], val_mean_auc=best["val_mean_auc"],
                         test_auc=test_auc, test_mean_auc=test_mean, undefined=undefined,
                         history=state.history, stop_reason=stop_reason, epochs=config.epochs,
                         label_names=list(label_names), dataset=vocabulary)
    save_adapted(out, training.model, model_name=config.model, base_weights=base,
                 label_names=label_names, vocabulary=vocabulary,
                 extra={"best_epoch": state.best_epoch, "val_mean_auc": best["val_mean_auc"],
                        "test_mean_auc": test_mean, "trainable_params": training.trainable_params,
                        "cxrembed_version": __version__})
    atomic_write_text(out / "summary.json", json.dumps(result.to_dict(), indent=2))
    state.complete = True
    state.save(out / "state", None, None, None)
    return result
