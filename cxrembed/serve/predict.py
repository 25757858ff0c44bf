"""Scores for a new image from a saved head, for ``cxrembed serve --head``.

The head is read with :func:`cxrembed.heads.saved.load_head`, the same reader as
``cxrembed predict``: a head folder of ``cxrembed fit`` (a card with per-class
calibration and val-chosen thresholds) or an adapt run folder (the run's own MLP head,
uncalibrated, no thresholds). The image is decoded and embedded as ``predict`` does and
the head's :meth:`~cxrembed.heads.saved.SavedHead.predict` gives the probability and the
positive call per class, so the page shows what ``cxrembed predict`` writes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)


class HeadPredictor:
    """A saved head and (loaded on first use) the encoder it was fitted for.

    Args:
        head: a ``cxrembed fit`` head folder or an adapt run folder.
        device: where the encoder runs.
    """

    def __init__(self, head: str | os.PathLike, *, device: str = "cpu") -> None:
        from cxrembed.heads.saved import load_head

        self.folder = Path(head)
        if not self.folder.is_dir():
            raise ConfigError(f"--head {head}: no such folder; pass a head folder (`cxrembed "
                              "fit ... --out HEAD`) or an adapt run folder")
        self.saved = load_head(self.folder)  # ConfigError naming what it expected
        self.device = device
        self._shared: Callable[[], Any] | None = None
        self._encoder: Any = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> dict:
        """The fingerprint of the encoder the head was fitted for."""
        return self.saved.fingerprint

    def share_encoder(self, factory: Callable[[], Any]) -> None:
        """Use the encoder ``factory`` gives (one with this head's fingerprint, e.g. the
        store's) instead of loading a second copy."""
        self._shared = factory

    def encoder(self) -> Any:
        with self._lock:
            if self._encoder is None:
                given = self._shared() if self._shared is not None else None
                self._encoder = self.saved.load_encoder(self.device, given)  # checked
            return self._encoder

    def thresholds(self) -> dict[str, float | None]:
        """Per class, the probability at the head's score threshold (None: none)."""
        out: dict[str, float | None] = {}
        for name in self.saved.label_names:
            cal = self.saved.calibration.get(name)
            if cal is None or math.isnan(cal.threshold):
                out[name] = None
            else:
                p = float(cal.probability(np.array([cal.threshold]))[0])
                out[name] = None if math.isnan(p) else p
        return out

    def describe(self) -> dict:
        card = self.saved.card
        calibration = card.get("calibration", {})
        return {"kind": self.saved.kind, "source": self.folder.name,
                "labels": self.saved.label_names, "thresholds": self.thresholds(),
                "calibration": calibration.get("method"),
                "threshold_rule": calibration.get("threshold_rule"),
                "note": calibration.get("note", "")}

    def predict_file(self, path: str | os.PathLike) -> dict:
        """Per class: calibrated probability, positive call, the threshold (as a
        probability) and the head's raw score, for one image file."""
        import torch

        from cxrembed.data.images import IMAGE_SIZE, decode
        from cxrembed.data.transforms import to_clip_tensor

        encoder = self.encoder()
        pixels = decode(path, size=IMAGE_SIZE)
        with torch.inference_mode():
            raw = encoder.encode_image(to_clip_tensor(pixels[None])).float().cpu().numpy()
        prediction = self.saved.predict(raw)
        thresholds = self.thresholds()
        scores = []
        for c, name in enumerate(self.saved.label_names):
            probability = float(prediction.probability[0, c])
            scores.append({"label": name,
                           "score": None if math.isnan(probability) else probability,
                           "positive": bool(prediction.positive[0, c]),
                           "threshold": thresholds[name],
                           "raw_score": float(prediction.scores[0, c])})
        return {"head": self.describe(), "scores": scores}


def load_predictor(head: str | os.PathLike, *, device: str = "cpu") -> HeadPredictor:
    """The predictor of a ``--head`` folder (ConfigError naming what was expected)."""
    return HeadPredictor(head, device=device)
