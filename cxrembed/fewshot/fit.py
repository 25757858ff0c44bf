"""``cxrembed fit``: one head fitted on a store's train split, kept with its card.

The head is made, drawn and fitted by the sweep's own functions
(:func:`~cxrembed.fewshot.sweep.sweep_head`, :func:`~cxrembed.fewshot.sweep.draw_sample`):
``fit --shots K --seed S`` is the head the sweep fits for (K, S), selected on the same val
sample. ``--all`` fits on every train row and selects on every val row. Then, on the whole
**val** split (never test): per-class calibration and thresholds
(:mod:`cxrembed.calibration`), val AUCs, and the reference for the out-of-distribution
check of ``predict`` (the 1st percentile of val images' mean similarity to their nearest
train images).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.fewshot.config import TEXT_HEADS, FewShotConfig

log = logging.getLogger(__name__)

FIT_HEADS = ("linear", "mlp", "knn", "tip", "zeroshot", "adapted")
#: Neighbours averaged for the out-of-distribution reference (and ``predict -k``'s check).
OOD_K = 5
OOD_MAX_ROWS = 2000  # val rows used for the reference percentile (a seeded sample)
OOD_QUERY_BATCH = 500  # val queries searched at once: bounds the exact scan's memory


def _fit_trained(kind: str, data: Any, config: FewShotConfig, shots: int | None, seed: int,
                 rows_train: np.ndarray, rows_val: np.ndarray) -> Any:
    """The sweep's head for (shots, seed), fitted as the sweep fits it."""
    from cxrembed.fewshot.sweep import single_thread, sweep_head

    init_state = data.adapted_state() if kind == "mlp" and config.init == "adapted" else None
    head = sweep_head(kind, config, data, shots or 0, seed, init_state)
    x_train = data.vectors(rows_train)[0 if head.input == "raw" else 1]
    x_val = y_val = None
    if len(rows_val):
        x_val = data.vectors(rows_val)[0 if head.input == "raw" else 1]
        y_val = data.labels[rows_val]
    if kind == "mlp":
        import torch  # noqa: F401  (loaded first so single_thread() pins its threads)
    with single_thread():
        head.fit(x_train, data.labels[rows_train], x_val, y_val,
                 known=data.known[rows_train])  # unknown labels left out, as in the sweep
    return head


def _make_head(kind: str, data: Any, config: FewShotConfig, shots: int | None, seed: int,
               all_rows: bool, options: dict[str, Any] | None
               ) -> tuple[Any, np.ndarray, np.ndarray]:
    """The fitted head and its train rows and val-sample rows (empty when training-free)."""
    from cxrembed.heads.saved import AdaptedHead

    none = np.zeros(0, np.int64)
    if kind == "adapted":
        return AdaptedHead({k: v.numpy() for k, v in data.adapted_state().items()}), none, none
    if kind == "zeroshot":
        from cxrembed.heads import make_head

        return make_head("zeroshot", text=data.text, **(options or {})), none, none
    if all_rows:
        rows_train, rows_val = data.rows("train"), data.rows("val")
    else:
        from cxrembed.fewshot.sweep import draw_sample

        rows_train, rows_val = draw_sample(data, config, shots, seed)
    if not len(rows_train):
        raise DataError(f"no train rows to fit {kind} on")
    return _fit_trained(kind, data, config, shots, seed, rows_train, rows_val), rows_train, rows_val


def ood_reference(store: Any, vectors_val: np.ndarray, k: int = OOD_K, seed: int = 0
                  ) -> dict[str, Any]:
    """1st percentile of val images' mean cosine similarity to their k nearest train images."""
    from cxrembed.heads.base import unit_rows
    from cxrembed.search import search_vectors
    from cxrembed.store import has_index, load_index

    n_train = int((store.split == "train").sum())
    if not len(vectors_val) or n_train < k:
        return {"k": k, "val_p01": None, "n_val": 0}
    rng = np.random.default_rng(seed)
    pick = (np.sort(rng.choice(len(vectors_val), OOD_MAX_ROWS, replace=False))
            if len(vectors_val) > OOD_MAX_ROWS else np.arange(len(vectors_val)))
    # In batches of queries: an exact scan holds (queries x 32k stored rows) at a time,
    # which for 2,000 queries was ~1.8 GB of a 100k-row store's fit. The index (if any)
    # is loaded once.
    loaded = load_index(store) if has_index(store.path) else None
    queries = unit_rows(vectors_val[pick])
    mean_sim = np.concatenate([
        search_vectors(store, queries[start:start + OOD_QUERY_BATCH], k, split="train",
                       loaded_index=loaded)[0].mean(axis=1)
        for start in range(0, len(queries), OOD_QUERY_BATCH)])
    return {"k": k, "val_p01": float(np.percentile(mean_sim, 1)), "n_val": int(len(pick)),
            "neighbours_from": "train"}


def fit_head(store_path: str | os.PathLike, kind: str, *, shots: int | None = None,
             seed: int = 0, all_rows: bool = False, calibration: str = "platt",
             threshold: str = "youden", options: dict[str, Any] | None = None,
             config: FewShotConfig | None = None, prompts: Any = None,
             out: str | os.PathLike | None = None, overwrite: bool = False) -> Any:
    """Fit one head on the store's train split and calibrate it on val.

    ``shots``/``seed``: the sweep's draw; ``all_rows``: every train row. ``options`` are
    the head's own (e.g. ``{"Cs": [0.1, 1]}``); ``config`` gives the sweep settings that
    shape draws and seeds (base ``seed``, ``no_finding``, ``init``). With ``out`` the head
    is saved there (an existing head there is refused unless ``overwrite``). Returns the
    :class:`~cxrembed.heads.saved.SavedHead`.
    """
    from cxrembed import __version__
    from cxrembed.calibration import fit_calibration
    from cxrembed.fewshot.data import EvalData
    from cxrembed.heads.saved import CARD_FORMAT, CARD_VERSION, SCORE_KIND, SavedHead, export_head
    from cxrembed.store import EmbeddingStore

    if out is not None and (Path(out) / "head.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a head; pass --overwrite to replace it, or "
                          "another --out")
    if kind not in FIT_HEADS:
        raise ConfigError(f"unknown head {kind!r}; expected one of: {', '.join(FIT_HEADS)}")
    trained = kind not in ("zeroshot", "adapted")
    if trained and (shots is None) == (not all_rows):
        raise ConfigError(f"head {kind}: give --shots K (with --seed S) or --all")
    if not trained and (shots is not None or all_rows):
        raise ConfigError(f"head {kind} is training-free: drop --shots/--all")
    base = dataclasses.asdict(config) if config is not None else {}
    config = FewShotConfig.from_dict({**base, "shots": (shots or 1,), "seeds": seed + 1,
                                      "heads": (kind,),
                                      "head_options": {kind: dict(options or {})}})
    with EmbeddingStore.open(store_path) as store:
        data = EvalData.from_store(store, prompts=prompts, need_text=kind in TEXT_HEADS)
        names = list(store.label_names)
        head, rows_train, rows_val = _make_head(kind, data, config, shots, seed, all_rows,
                                                options)
        train_pair = ((data.vectors(rows_train)[0], data.labels[rows_train])  # kept shots
                      if kind in ("knn", "tip") and len(rows_train) else None)
        arrays = export_head(kind, head, train_pair, data.text)
        card = {
            "format": CARD_FORMAT, "format_version": CARD_VERSION, "kind": kind,
            "options": dict(options or {}), "selected": getattr(head, "selected", {}),
            "input": head.input, "score_kind": SCORE_KIND[kind],
            "shots": shots, "seed": seed, "all_rows": all_rows,
            "sweep_config": {"seed": config.seed, "no_finding": config.no_finding,
                             "init": config.init},
            "store": str(store.path), "fingerprint": store.fingerprint,
            "load_args": store.attrs.get("load_args"), "embed_dim": store.embed_dim,
            "label_names": names,
            "train_ids": [str(i) for i in store.image_id[rows_train]],
            "val_sample_ids": [str(i) for i in store.image_id[rows_val]],
            "prompts": data.source.get("prompts"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cxrembed_version": __version__,
        }
        saved = SavedHead(kind, head, card, {}, arrays)
        _calibrate_on_val(saved, store, data, calibration, threshold, fit_calibration)
    if out is not None:
        saved.save(out)
    return saved


def _calibrate_on_val(saved: Any, store: Any, data: Any, method: str, rule: str,
                      fit_calibration: Any) -> None:
    """Calibration, thresholds, val metrics and the OOD reference, all from val rows."""
    from cxrembed.calibration import expected_calibration_error, uncalibrated
    from cxrembed.metrics import mean_auc, per_class_auc

    val = data.rows("val")
    if not len(val):
        raise DataError(f"store {store.path} has no val rows: calibration and thresholds "
                        "are fitted on val (never test); encode a val split")
    raw = data.vectors(val)[0]
    labels = data.labels[val].astype(np.uint8)
    scores = saved.scores(raw)
    saved.calibration = fit_calibration(scores, labels, saved.label_names, method=method,
                                        rule=rule, score_kind=saved.card["score_kind"])
    auc = per_class_auc(labels, scores, warn=False)
    after = saved.predict(raw).probability
    before = uncalibrated(scores, saved.card["score_kind"])
    ece_before = [expected_calibration_error(before[:, c], labels[:, c])[0]
                  for c in range(labels.shape[1])]
    ece_after = [expected_calibration_error(after[:, c], labels[:, c])[0]
                 for c in range(labels.shape[1])]

    def num(x: float) -> float | None:
        return None if x is None or np.isnan(x) else float(x)

    saved.card["calibration"] = {
        "method": method, "threshold_rule": rule, "fitted_on": "val", "n_val": int(len(val)),
        "not_calibrated": [n for n, c in saved.calibration.items() if c.note]}
    saved.card["val_metrics"] = {
        "split": "val", "n": int(len(val)), "mean_auc": num(mean_auc(auc, warn=False)),
        "auc": {n: num(a) for n, a in zip(saved.label_names, auc)},
        "ece_uncalibrated": {n: num(e) for n, e in zip(saved.label_names, ece_before)},
        "ece_calibrated_in_sample": {n: num(e) for n, e in zip(saved.label_names, ece_after)}}
    saved.card["ood"] = ood_reference(store, raw)
