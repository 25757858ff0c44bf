"""``adapt()``: cheap checks first, then the model, then the first write, then training,
then test once with the best weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.adapt.config import AdaptConfig
from cxrembed.adapt.evaluate import evaluate_split, undefined_classes
from cxrembed.adapt.result import AdaptResult, AdaptStart
from cxrembed.data.splits import SPLITS
from cxrembed.distributed import active, barrier, in_process_group
from cxrembed.errors import DataError
from cxrembed.labels import LABELS


log = logging.getLogger(__name__)


def label_set(dataset: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """The dataset's label names and its known-label mask (all known when it has none)."""
    names = tuple(getattr(dataset, "label_names", None) or LABELS)
    known = getattr(dataset, "label_known", None)
    return names, (np.ones(dataset.labels.shape, bool) if known is None
                   else np.asarray(known, dtype=bool))


def _load_dataset(data: Any, config: AdaptConfig, csv_path: Any, train_val_list: Any,
                  test_list: Any, data_options: dict[str, Any] | None) -> Any:
    """Any collection :func:`cxrembed.data.load_dataset` reads (``data_options``: its
    ``dataset`` and reader options such as ``uncertain`` or the csv columns)."""
    from cxrembed.data import load_dataset

    if not isinstance(data, (str, os.PathLike)):
        return data
    options = dict(data_options or {})
    return load_dataset(data, options.pop("dataset", "auto"), csv_path=csv_path,
                        train_val_list=train_val_list, test_list=test_list, view=config.view,
                        val_fraction=config.val_fraction, seed=config.split_seed,
                        missing="drop" if config.allow_missing else "error", **options)


def _check_splits(dataset: Any) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Rows per split and the classes whose AUC is undefined in val / test; DataError when
    nothing could be selected on val."""
    rows = {s: dataset.split_rows(s) for s in SPLITS}
    for split in ("train", "val"):
        if not len(rows[split]):
            raise DataError(f"the {split} split is empty ({len(dataset)} images in all); adapt "
                            "needs train and val images")
    names, known = label_set(dataset)
    undefined = {s: undefined_classes(dataset.labels[rows[s]], known[rows[s]], names)
                 for s in ("val", "test")}
    if not known[rows["val"]].all():
        log.info("val AUC (selection, scheduler, early stop) leaves unknown labels out of "
                 "their class (%d of %d val labels unknown), as test AUC does",
                 int((~known[rows["val"]]).sum()), known[rows["val"]].size)
    if len(undefined["val"]) == len(names):
        raise DataError("no class has both positives and negatives in val: val AUC is undefined "
                        "for every class, so nothing can be selected; use more images or a "
                        "larger --val-fraction")
    if undefined["val"]:
        log.warning("val has no positives (or no negatives) among the known labels of %s: "
                    "their AUC is undefined and left out of the val mean used for selection "
                    "(as test leaves such classes out of its mean)", ", ".join(undefined["val"]))
    return rows, undefined


@in_process_group
def adapt(data: Any, out: str | os.PathLike, config: AdaptConfig | None = None, *,
          pixel_cache: str | os.PathLike | None = None, resume: bool = False,
          overwrite: bool = False, device: str | None = None, progress: bool = True,
          trust_pickle: bool = False, csv_path: str | os.PathLike | None = None,
          train_val_list: str | os.PathLike | None = None,
          test_list: str | os.PathLike | None = None,
          data_options: dict[str, Any] | None = None,
          on_start: Callable[[AdaptStart], None] | None = None,
          on_step: Callable[[int, int], None] | None = None) -> AdaptResult:
    """Adapt CLIP to the dataset and write the run folder ``out`` (see :mod:`cxrembed.adapt`).

    Args:
        data: a data folder of any collection :func:`cxrembed.data.load_dataset` reads
            (NIH, CheXpert, MIMIC, PadChest, a CSV, class folders), or an already loaded
            :class:`~cxrembed.data.ImageTable`. The head has one output per label of it.
        config: hyper-parameters (default: the paper's).
        pixel_cache: a pixel cache of the dataset (no PNG decoding per epoch).
        resume: continue the run in ``out`` (or return its result when finished).
        overwrite: replace the run in ``out``.
        device: ``cuda``, ``cpu``, ... (default: CUDA when available).
        trust_pickle: allow a weights file with pickled objects (see cxrembed.model).
        csv_path, train_val_list, test_list: copies elsewhere of the official files.
        data_options: ``dataset`` (default ``auto``) and reader options (``uncertain``,
            ``blank``, ``test_fraction``, the csv columns ...) for a folder ``data``.
        on_start: called once training is set up, with an :class:`AdaptStart`.
        on_step: called as ``on_step(epoch, step)`` after every optimiser step.

    Under ``torchrun`` every process calls this with the same arguments: they train one
    model with DistributedDataParallel (``config.batch_size`` is the global batch) and
    rank 0 alone writes ``out`` (see :mod:`cxrembed.adapt.loop`).
    """
    from cxrembed.adapt.build import build_training
    from cxrembed.adapt.loop import EpochData, check_global_batch, run_epochs
    from cxrembed.adapt.run_folder import (begin_run, check_run_folder, finish_run,
                                           restore_state)
    from cxrembed.data.cache import ImageSource
    from cxrembed.device import resolve_device
    from cxrembed.model import check_model_name, create_clip

    config = config or AdaptConfig()
    config.validate()
    check_model_name(config.model)
    out = Path(out)
    dev = resolve_device(device)
    here = active()
    check_global_batch(config, here)
    dataset = _load_dataset(data, config, csv_path, train_val_list, test_list, data_options)
    rows, undefined = _check_splits(dataset)
    source_images = ImageSource(dataset, pixel_cache)
    source_images.read(rows["train"][:1])  # an unreadable image or cache fails here, not later
    folder = check_run_folder(out, config, dataset, resume, overwrite, data_options)
    barrier()  # every rank has read the folder before rank 0 writes to it
    if folder.finished:
        log.info("%s is complete; returning its result", out)
        return AdaptResult.from_summary(out)

    # Weights are the same every time; the head's init depends on the seed only.
    clip, source = create_clip(config.model, config.pretrained, trust_pickle=trust_pickle,
                               quick_gelu=config.quick_gelu)
    names, known = label_set(dataset)
    training = build_training(clip, config, dev, dataset.labels[rows["train"]],
                              known[rows["train"]], here)
    base = source.fingerprint()
    if here.main:
        begin_run(folder, base, str(config.pretrained))  # the first write of the run
    state = restore_state(folder, training)
    data_for_epochs = EpochData(source_images, dataset.labels, rows, known, names)
    if on_start is not None:
        on_start(AdaptStart(
            model=config.model, weights=source.describe(), device=str(dev),
            trainable_params=training.trainable_params, unfreeze=config.unfreeze,
            epochs_done=state.epochs_done, epochs=config.epochs, workers=config.loader_workers,
            processes=here.world_size, **{split: int(len(r)) for split, r in rows.items()}))
    run_epochs(training, state, config, dev, data_for_epochs, out, progress, on_step)

    # Test: once, with the best weights, never used for any choice.
    training.model.load_trainable_state_dict(state.best_weights)
    test_scores = None
    if len(rows["test"]):
        test_scores = evaluate_split(training.infer, source_images, dataset.labels,
                                     rows["test"], "test", config, dev, progress and here.main)
    if not here.main:
        barrier()  # rank 0 writes the model and summary.json
        return AdaptResult.from_summary(out)
    test = rows["test"] if test_scores is not None else None
    result = finish_run(out, training, config, base, state, undefined,
                        None if test is None else dataset.labels[test], test_scores,
                        label_names=names, vocabulary=getattr(dataset, "dataset", "nih"),
                        test_known=None if test is None else known[test])
    barrier()
    return result
