"""Domain adaptation: fine-tune CLIP's top visual blocks with the paper's head.

``adapt(data, out, config)`` trains on the train split, selects on **val** (scheduler,
early stopping, best weights) and evaluates test **once**, at the end, with the best
weights. Everything it needs to continue after a kill is in the run folder::

    RUN/
      config.json          the resolved AdaptConfig + data identity + base weights
      metrics.jsonl        one JSON line per epoch; one final line for test
      state/               resume state, written atomically at every epoch end
        progress.json      the commit point: epochs done, scheduler, best, history, files
        trainable-NNN.safetensors   trainable weights after epoch NNN
        optimizer-NNN.safetensors   AdamW moments after epoch NNN (+ JSON in progress)
        best-NNN.safetensors        trainable weights of the best val epoch so far
      model.safetensors    the adapted encoder (best epoch): what `encode` loads
      model.json           its metadata (see cxrembed.model.adapted)
      summary.json         per-class val and test AUC, best epoch, counts, why it stopped

Randomness is a pure function of ``(seed, epoch)`` (shuffle, augmentation draws, dropout),
so a run killed mid-epoch and resumed replays that epoch exactly from the last epoch
checkpoint and ends with the same weights and metrics as an uninterrupted run (on the
CPU; CUDA kernels are not all bitwise deterministic).

The parts: :mod:`~cxrembed.adapt.config` (the hyper-parameters),
:mod:`~cxrembed.adapt.run_folder` (checks, resume, the writes at start and end),
:mod:`~cxrembed.adapt.build` (model, optimiser, scheduler), :mod:`~cxrembed.adapt.loop`
(the epochs), :mod:`~cxrembed.adapt.evaluate` (batches and AUC), :mod:`~cxrembed.adapt.run`
(``adapt()``, which composes them). Importing this package does not import torch.
"""

from cxrembed.adapt.config import AdaptConfig, default_workers
from cxrembed.adapt.evaluate import auc_report, evaluate_split, undefined_classes
from cxrembed.adapt.loop import TrainingInterrupted
from cxrembed.adapt.result import AdaptResult, AdaptStart
from cxrembed.adapt.run import adapt

__all__ = ["AdaptConfig", "AdaptResult", "AdaptStart", "TrainingInterrupted", "adapt",
           "auc_report", "default_workers", "evaluate_split", "undefined_classes"]
