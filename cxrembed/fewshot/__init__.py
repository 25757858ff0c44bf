"""Few-shot sampling, the sweep over shots x seeds x heads, and the training-free protocols.

A notebook runs a sweep in two lines::

    from cxrembed.fewshot import run_fewshot
    result = run_fewshot("nih.h5", shots=(1, 2, 4, 8, 16), seeds=10, out="runs/fewshot")

Protocol (the paper's, with its leaks closed):

* For each shot count K and seed, K positives per class are drawn from the **train**
  split only (all of a class when it has fewer), plus K "No Finding" images as negatives
  (``no_finding=True``). Draws are nested: for one seed, the 2-shot sample contains the
  1-shot sample, so a curve over K compares like with like. Images drawn for one class
  are kept once (an image may carry several classes).
* A val sample is drawn the same way from the **val** split; heads use it for their own
  choices (C, alpha/beta, epoch) and for nothing else.
* The test split is never read before scoring: its vectors are only passed to
  ``predict`` and its labels only to the AUC.
* Every (head, K) cell reports the mean +- std over seeds of the per-class and mean AUC
  and a bootstrap interval that resamples test *patients* (``FewShotConfig.ci``).

Modules: ``data`` (:class:`EvalData`, numpy arrays or a store), ``sampling`` (drawing
shots), ``config`` (:class:`FewShotConfig`), ``sweep`` (:func:`run_fewshot`), ``results``
(:class:`FewShotResult` and its files), ``protocols`` (:func:`evaluate_zeroshot`,
:func:`evaluate_adapted_head`).
"""

from cxrembed.fewshot.config import CI_METHODS, TEXT_HEADS, TRAINING_FREE, FewShotConfig
from cxrembed.fewshot.data import EvalData, as_eval_data, store_text
from cxrembed.fewshot.protocols import EvalResult, evaluate_adapted_head, evaluate_zeroshot
from cxrembed.fewshot.results import (RESULT_FORMAT, FewShotResult, load_result,
                                      plot_fewshot, write_runs_csv, write_summary_csv)
from cxrembed.fewshot.sampling import (check_shots, class_supply, describe_shortfall,
                                       sample_shots, seeded_rng, shot_orders, take_shots)
from cxrembed.fewshot.sweep import run_fewshot

__all__ = [
    "CI_METHODS", "EvalData", "EvalResult", "FewShotConfig", "FewShotResult",
    "RESULT_FORMAT", "TEXT_HEADS", "TRAINING_FREE", "as_eval_data", "check_shots",
    "class_supply", "describe_shortfall", "evaluate_adapted_head", "evaluate_zeroshot", "load_result", "plot_fewshot", "run_fewshot", "sample_shots",
    "seeded_rng", "shot_orders", "store_text", "take_shots",
    "write_runs_csv", "write_summary_csv",
]
