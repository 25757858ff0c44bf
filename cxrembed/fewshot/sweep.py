"""The sweep: shots x seeds x heads on cached vectors, scored on the test split.

Order of work: the training-free heads (zeroshot, adapted) are scored once; then for each
shot count, every seed's sample is drawn (train and val), and each head is fitted on every
seed's sample (``fit_many`` trains the seeds together where a head has it) and predicts
the test vectors. Test labels are touched only by the scorer, in a second thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.fewshot.config import TEXT_HEADS, TRAINING_FREE, FewShotConfig
from cxrembed.fewshot.data import EvalData, as_eval_data
from cxrembed.fewshot.results import FewShotResult, eval_set, json_number, per_class_dict
from cxrembed.fewshot.sampling import (check_shots, class_supply, describe_shortfall,
                                       sample_shots, seeded_rng)
from cxrembed.heads.base import single_thread, thread_limit, torch_device
from cxrembed.metrics import (macro_replicates, mean_auc, per_class_auc, percentile_interval,
                              replicate_aucs, resample_patients)

log = logging.getLogger(__name__)

#: BLAS/torch threads for the heads' test predictions (fits keep to one: a stream of tiny
#: products): every core this process may use, as torch's own default would. The scoring
#: thread runs beside them; ``benchmarks/bench_fewshot.py --predict-threads`` measures the
#: alternatives. Measured at NIH size on the idle 2-core machine: 2 threads 33.3 s wall /
#: 54.1 s CPU for the sweep against 44.0 s / 52.9 s with 1 (MLP predictions 9.3 s against
#: 17.7 s). On a machine shared with other jobs it is the other way round (load 9-11: 2
#: threads took 75 s CPU and 679 s wall against 58 s and 282 s with 1): set it to 1 there.
#: Scores differ only by float rounding (tested).
PREDICT_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
    os.cpu_count() or 1)


class _Scorer:
    """Point AUCs and patient-bootstrap replicates on the test split, resamples shared by
    every head and shot count (so cells are compared on the same resamples)."""

    def __init__(self, labels: np.ndarray, patient_id: np.ndarray, config: FewShotConfig,
                 known: np.ndarray | None = None, names: tuple[str, ...] | None = None,
                 device: str = "cpu"):
        self.labels, self.known = labels, known
        self.names = tuple(names) if names is not None else tuple(
            f"class {i}" for i in range(labels.shape[1]))
        self.index = np.unique(patient_id, return_inverse=True)[1].reshape(-1)
        self.method = config.ci if config.bootstrap else "none"
        self.level = config.level
        self.seeds = config.seeds
        self.weights = (resample_patients(int(self.index.max()) + 1, config.bootstrap,
                                          config.seed) if self.method != "none" else None)
        # numpy on the CPU; torch (weighted_aucs_torch, tested on the CPU) on a GPU
        self.device = None if device == "cpu" else device

    def score(self, scores: np.ndarray, seed_slot: int | None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """Point AUCs and the replicates this seed contributes (all for training-free)."""
        if self.weights is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return per_class_auc(self.labels, scores, warn=False, known=self.known), None
        w = self.weights
        if seed_slot is not None and self.method == "pooled":
            w = self.weights[:, seed_slot::self.seeds]
        return replicate_aucs(self.labels, scores, self.index, w, known=self.known,
                              device=self.device)

    def summarise(self, points: list[np.ndarray], reps: list[np.ndarray | None],
                  training_free: bool) -> dict[str, Any]:
        """Mean +- std over seeds and the interval of the seed mean, per class and macro."""
        points_arr = np.stack(points)  # (S, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_c = points_arr.mean(axis=0)
            std_c = (points_arr.std(axis=0, ddof=1) if len(points) > 1
                     else np.zeros(len(self.names)))
        macro = np.array([mean_auc(p, warn=False) for p in points_arr])
        low_c = high_c = np.full(len(self.names), np.nan)
        mean_low = mean_high = float("nan")
        if reps[0] is not None:
            if training_free or self.method == "full":
                rep = np.mean(np.stack(reps), axis=0)  # (B, C): seed mean per resample
                rep_macro = macro_replicates(mean_c, rep)
            else:  # pooled: seed mean + the deviation of the seed each resample scored
                rep = np.concatenate([r - p for p, r in zip(points, reps)]) + mean_c
                rep_macro = np.concatenate([macro_replicates(p, r) - m for p, r, m in
                                            zip(points, reps, macro)]) + macro.mean()
            low_c, high_c = percentile_interval(rep, self.level)
            low, high = percentile_interval(rep_macro[:, None], self.level)
            mean_low, mean_high = float(low[0]), float(high[0])
        return {
            "n_seeds": len(points),
            "mean_auc": {"mean": json_number(macro.mean()),
                         "std": json_number(macro.std(ddof=1)) if len(points) > 1 else 0.0,
                         "ci_low": json_number(mean_low), "ci_high": json_number(mean_high)},
            "per_class": {name: {"mean": json_number(m), "std": json_number(s),
                                 "ci_low": json_number(lo), "ci_high": json_number(hi)}
                          for name, m, s, lo, hi in zip(self.names, mean_c, std_c, low_c,
                                                        high_c)},
        }


def _head_kwargs(name: str, config: FewShotConfig, data: EvalData, seed: int,
                 init_state: dict | None, device: str | None = None) -> dict[str, Any]:
    from cxrembed.heads import HEADS

    kwargs = dict(config.head_options.get(name, {}))
    kwargs["seed"] = seed
    if getattr(HEADS[name], "needs_text", False):
        kwargs["text"] = data.text
    if name == "mlp" and init_state is not None:
        kwargs["init_state"] = init_state
    if name == "mlp":
        kwargs.setdefault("device", device or config.device)
    return kwargs


def sweep_head(name: str, config: FewShotConfig, data: EvalData, shots: int, seed: int,
               init_state: dict | None = None, device: str | None = None) -> Any:
    """The unfitted head the sweep fits on draw ``seed`` at ``shots``: its options, its own
    seed, the prompt vectors it needs (``device``: the resolved ``config.device``).
    ``cxrembed fit`` makes its heads here too."""
    from cxrembed.heads import make_head

    head_seed = int(seeded_rng(config.seed, seed, shots, 7).integers(2**31))
    return make_head(name, **_head_kwargs(name, config, data, head_seed, init_state, device))


def draw_sample(data: EvalData, config: FewShotConfig, shots: int | Sequence[int], seed: int
                ) -> tuple[Any, Any]:
    """Rows of the sweep's draw ``seed`` at ``shots``: train shots and the val sample, as
    :func:`~cxrembed.fewshot.sampling.sample_shots` draws them. A sequence of shot counts
    gives a list of each (nested samples, one draw)."""
    train = sample_shots(data.labels, data.split, shots, seed, split_name="train",
                         no_finding=config.no_finding, base_seed=config.seed, known=data.known)
    if len(data.rows("val")):
        val = sample_shots(data.labels, data.split, shots, seed, split_name="val",
                           no_finding=config.no_finding, base_seed=config.seed,
                           known=data.known)
    else:
        val = (np.zeros(0, np.int64) if isinstance(shots, (int, np.integer))
               else [np.zeros(0, np.int64)] * len(shots))
    return train, val


def run_fewshot(source: Any, config: FewShotConfig | None = None, *,
                out: str | os.PathLike | None = None, prompts: Any = None,
                progress: bool = False, keep_scores: bool = False, **options: Any
                ) -> FewShotResult:
    """Run the sweep shots x seeds x heads on ``source`` (store path, store or EvalData).

    ``options`` are :class:`FewShotConfig` fields (``shots``, ``seeds``, ``heads``, ...),
    applied over ``config``. With ``out`` the result is also saved there
    (:meth:`FewShotResult.save`); ``keep_scores`` keeps every test score matrix in
    ``result.scores``.
    """
    base = dataclasses.asdict(config) if config is not None else {}
    config = FewShotConfig.from_dict({**base, **options})
    started = time.perf_counter()
    if isinstance(source, (str, os.PathLike)) or hasattr(source, "path"):
        from cxrembed.memory import check_fewshot_store

        check_fewshot_store(getattr(source, "path", source), config.test_split)
    data = as_eval_data(source, prompts=prompts,
                        need_text=any(h in TEXT_HEADS for h in config.heads))
    try:
        with _Sweep(data, config, keep_scores) as sweep:
            sweep.score_training_free()
            sweep.score_few_shot(progress)
            result = sweep.result(started)
    finally:
        if data is not source:
            data.close()
    if out is not None:
        result.save(out)
    return result


class _Sweep:
    """The state of one sweep: test vectors, the scorer, and the scoring thread.

    Scoring (AUCs + bootstrap replicates) runs in a second thread while the next head
    fits: fits are pinned to one core, numpy's sorting and sparse products release the
    GIL, so the two overlap on a 2-core machine. Results do not depend on the timing.
    """

    def __init__(self, data: EvalData, config: FewShotConfig, keep_scores: bool) -> None:
        if any(h in TEXT_HEADS for h in config.heads) and data.text is None:
            raise ConfigError("heads zeroshot and tip need prompt embeddings (EvalData.text)")
        # "auto" resolved once, and an absent GPU refused now, before any work
        self.device = str(torch_device(config.device)) if config.device != "cpu" else "cpu"
        self.data, self.config = data, config
        self.test = data.rows(config.test_split)
        self.train, self.val = data.rows("train"), data.rows("val")
        if not len(self.test) or not len(self.train):
            raise DataError(f"the sweep needs train and {config.test_split} rows; found "
                            f"{len(self.train)} train, {len(self.test)} {config.test_split}")
        supply = {split: class_supply(data.labels, data.split, split, config.no_finding,
                                      data.label_names, data.known)
                  for split in ("train", "val")}
        self.shortfall = check_shots(config.shots, supply["train"])
        if len(self.val):
            self.shortfall += check_shots(config.shots, supply["val"], "val", refuse=False)
        for line in describe_shortfall(self.shortfall):  # also in the result and the CLI
            log.info("%s", line)
        self.x_test_raw, self.x_test_unit = data.vectors(self.test)
        self.scorer = _Scorer(data.labels[self.test].astype(np.uint8),
                              data.patient_id[self.test], config, data.known[self.test],
                              data.label_names, self.device)
        self.trained = [h for h in config.heads if h not in TRAINING_FREE]
        self.free = [h for h in config.heads if h in TRAINING_FREE]
        if ("adapted" in self.free or (config.init == "adapted" and "mlp" in self.trained)) \
                and list(data.head_label_names) != list(data.label_names):
            raise ConfigError(
                f"the adapted head's classes ({', '.join(data.head_label_names)}) are not the "
                f"store's ({', '.join(data.label_names)}): leave out the adapted head and "
                "--init adapted here, and score it with `cxrembed evaluate STORE --head "
                "adapted`, which maps the shared classes")
        self.init_state = (data.adapted_state()
                           if config.init == "adapted" and "mlp" in self.trained else None)
        self.runs: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.scores: dict | None = {} if keep_scores else None
        self.fit_seconds = {h: 0.0 for h in config.heads}
        self.predict_seconds = {h: 0.0 for h in self.trained}
        self.pending: list[tuple[dict[str, Any], Future]] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrembed-score")
        self.text_logits: np.ndarray | None = None  # tip's, of the test vectors

    def __enter__(self) -> "_Sweep":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def _timed_score(self, scores: np.ndarray, seed: int | None) -> tuple[Any, Any, float]:
        t0 = time.perf_counter()
        point, reps = self.scorer.score(scores, seed)
        return point, reps, time.perf_counter() - t0

    def record(self, head: str, shots: int, seed: int | None, scores: np.ndarray,
               seconds: float, selected: dict, n_train: int = 0, n_val: int = 0) -> None:
        run = {"head": head, "shots": shots, "seed": seed, "auc": None, "mean_auc": None,
               "selected": selected, "seconds": seconds, "n_train": n_train, "n_val": n_val}
        self.runs.append(run)
        self.fit_seconds[head] += seconds
        self.pending.append((run, self.pool.submit(self._timed_score, scores, seed)))
        if self.scores is not None:
            self.scores[(head, shots, seed)] = scores.astype(np.float32)

    def score_training_free(self) -> None:
        """Zero-shot and the adapted head: one score set each, shots 0, no seed."""
        from cxrembed.heads import make_head

        for head in self.free:
            t0 = time.perf_counter()
            if head == "adapted":
                scores = self.data.logits(self.test)
            else:
                scores = make_head("zeroshot", text=self.data.text,
                                   label_names=self.data.label_names).predict(self.x_test_unit)
            self.record(head, 0, None, scores, time.perf_counter() - t0, {})

    def score_few_shot(self, progress: bool) -> None:
        """Every (shots, seed) draw, every trained head on it. A head class with
        ``fit_many`` (mlp) trains the seeds of one shot count together."""
        from cxrembed.progress import progress_bar

        config, data = self.config, self.data
        if "mlp" in self.trained:
            import torch  # noqa: F401  (loaded now so single_thread() can pin its threads)
        draws_per_seed = [draw_sample(data, config, config.shots, seed)
                          for seed in range(config.seeds)]
        total = len(config.shots) * config.seeds * len(self.trained)
        with progress_bar(total, "few-shot sweep", enabled=progress and total > 0,
                          unit="fit") as advance:
            for k, shots in enumerate(config.shots):
                draws = []
                for seed, (train_samples, val_samples) in enumerate(draws_per_seed):
                    rows_train, rows_val = train_samples[k], val_samples[k]
                    self.samples.append(_sample_record(data, shots, seed, rows_train,
                                                       rows_val))
                    draws.append(_Draw(data, seed, rows_train, rows_val))
                for name in self.trained:
                    self._fit_head(name, shots, draws)
                    advance(len(draws), head=name)

    def _fit_head(self, name: str, shots: int, draws: list["_Draw"]) -> None:
        """One head on every seed's draw at this shot count; scores handed to scoring."""
        from cxrembed.heads import HEADS

        heads = [sweep_head(name, self.config, self.data, shots, d.seed, self.init_state,
                            self.device) for d in draws]
        raw = heads[0].input == "raw"
        fit_many = getattr(HEADS[name], "fit_many", None)
        fit_seconds = []
        # Fits keep this thread to one core; the scoring thread has the other. Measured
        # here under load, a second BLAS/torch thread made fits slower, never faster.
        with single_thread():
            if fit_many is not None:
                t0 = time.perf_counter()
                fit_many(heads, [(*d.fit_args(raw), d.known) for d in draws])
                fit_seconds = [(time.perf_counter() - t0) / len(draws)] * len(draws)
            else:
                for head, draw in zip(heads, draws):
                    t0 = time.perf_counter()
                    head.fit(*draw.fit_args(raw), known=draw.known)
                    fit_seconds.append(time.perf_counter() - t0)
        with thread_limit(PREDICT_THREADS):
            x_test = self.x_test_raw if raw else self.x_test_unit
            predict_many = getattr(HEADS[name], "predict_many", None)
            t0 = time.perf_counter()
            if predict_many is not None:  # every seed's head in one pass
                all_scores = predict_many(heads, x_test)
                predict_seconds = [(time.perf_counter() - t0) / len(heads)] * len(heads)
            else:
                all_scores, predict_seconds = [], []
                shared = self._shared_inputs(name, heads[0], x_test)
                for head, draw in zip(heads, draws):
                    if getattr(head, "shares_similarity", False):  # knn and tip: computed once
                        shared["similarity"] = draw.test_similarity(x_test)
                    all_scores.append(head.predict(x_test, **shared))
                    predict_seconds.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
            for head, draw, scores, fit_s, predict_s in zip(heads, draws, all_scores,
                                                             fit_seconds, predict_seconds):
                self.record(name, shots, draw.seed, scores, fit_s + predict_s, head.selected,
                            len(draw.rows_train), len(draw.rows_val))
            self.predict_seconds[name] += sum(predict_seconds)

    def _shared_inputs(self, name: str, head: Any, x_test: np.ndarray) -> dict[str, Any]:
        """What every seed's head of ``name`` takes alike: Tip-Adapter's text logits of the
        test vectors (the same for every draw, computed once per sweep)."""
        if name != "tip":
            return {}
        if self.text_logits is None:
            self.text_logits = head.zeroshot.logits(x_test)
        return {"text_logits": self.text_logits}

    def result(self, started: float) -> FewShotResult:
        """Wait for the scoring thread, then summarise every (head, shots) cell."""
        t0 = time.perf_counter()
        scoring_seconds = 0.0
        collected: dict[tuple[str, int], tuple[list, list]] = {}
        for run, future in self.pending:
            point, reps, seconds = future.result()
            scoring_seconds += seconds
            run["auc"] = per_class_dict(point, self.data.label_names)
            run["mean_auc"] = json_number(mean_auc(point, warn=False))
            bucket = collected.setdefault((run["head"], run["shots"]), ([], []))
            bucket[0].append(point)
            bucket[1].append(reps)
        summary = [{"head": head, "shots": shots,
                    **self.scorer.summarise(points, reps, head in TRAINING_FREE)}
                   for (head, shots), (points, reps) in collected.items()]
        cells = len(self.config.shots) * self.config.seeds * len(self.trained)
        timing = {"total_s": time.perf_counter() - started,
                  "fit_predict_s": self.fit_seconds, "predict_s": self.predict_seconds,
                  "scoring_s": scoring_seconds,
                  "scoring_wait_s": time.perf_counter() - t0, "cells": cells,
                  "per_cell_s": (sum(self.fit_seconds[h] for h in self.trained) / cells)
                  if cells else None}
        config = self.config
        source = {**self.data.source, "n_test": int(len(self.test)),
                  "eval_set": eval_set(config.test_split, self.data.image_id, self.test),
                  "n_test_patients": int(self.scorer.index.max()) + 1,
                  "n_train": int(len(self.train)), "n_val": int(len(self.val)),
                  "shortfall": self.shortfall, "device": self.device,
                  "ci": {"method": self.scorer.method, "n_resamples": config.bootstrap,
                         "level": config.level, "unit": "patient", "seed": config.seed}}
        return FewShotResult(config=config, runs=self.runs, summary=summary,
                             samples=self.samples, source=source, timing=timing,
                             scores=self.scores, label_names=self.data.label_names)


class _Draw:
    """One (shots, seed) sample: its rows, and their raw and unit vectors and labels."""

    def __init__(self, data: EvalData, seed: int, rows_train: np.ndarray,
                 rows_val: np.ndarray) -> None:
        self.seed, self.rows_train, self.rows_val = seed, rows_train, rows_val
        self.train = (*data.vectors(rows_train), data.labels[rows_train])
        #: the shots' known-label mask (None when all are known): left out of every fit
        known = data.known[rows_train]
        self.known = None if known.all() else known
        self.val = ((*data.vectors(rows_val), data.labels[rows_val]) if len(rows_val)
                    else (None, None, None))
        self._similarity: np.ndarray | None = None

    def test_similarity(self, x_test_unit: np.ndarray) -> np.ndarray:
        """Cosines ``(test, shots)`` of the test vectors to this draw's shots, float32,
        computed once for the heads that share them (knn and tip)."""
        if self._similarity is None:
            self._similarity = x_test_unit @ self.train[1].T
        return self._similarity

    def fit_args(self, raw: bool) -> tuple[Any, Any, Any, Any]:
        pick = 0 if raw else 1  # (raw, unit, labels)
        return self.train[pick], self.train[2], self.val[pick], self.val[2]


def _sample_record(data: EvalData, shots: int, seed: int, rows_train: np.ndarray,
                   rows_val: np.ndarray) -> dict[str, Any]:
    rec: dict[str, Any] = {"shots": shots, "seed": seed, "train_rows": rows_train.tolist(),
                           "val_rows": rows_val.tolist()}
    if data.image_id is not None:
        rec["train_ids"] = [str(i) for i in data.image_id[rows_train]]
        rec["val_ids"] = [str(i) for i in data.image_id[rows_val]]
    return rec
