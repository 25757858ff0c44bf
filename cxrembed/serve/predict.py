"""Scores for a new image from a head, for ``cxrembed serve --head``.

The seam: :func:`load_predictor` turns the ``--head`` folder into an object with
``describe() -> dict`` and ``predict_file(path) -> dict``; the server needs nothing else.
Today it reads an adapt run folder (``model.json`` + ``model.safetensors`` of
``cxrembed adapt``): the adapted encoder embeds the image and the run's own MLP head
scores it, exactly as ``cxrembed encode --checkpoint RUN`` stores ``head_logits``. An
adapt run records no decision thresholds, so none are shown. A saved few-shot head
(``cxrembed fit``: a card with thresholds and calibration) is the second kind the seam is
for; a folder of that kind is refused with a message saying so until it is wired here.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)


class RunHeadPredictor:
    """The adapted model's own head on a new image (an ``cxrembed adapt`` run folder).

    Args:
        run: the run folder; its ``model.json`` is checked now, the weights are loaded on
            the first prediction.
        encoder_factory: returns the run's loaded encoder; default loads it from ``run``
            (a server whose store was encoded with the same run passes its own encoder).
    """

    kind = "adapted-head"

    def __init__(self, run: str | os.PathLike, *, device: str = "cpu",
                 encoder_factory: Callable[[], Any] | None = None) -> None:
        from cxrembed.model.adapted import read_adapted_meta

        self.run = Path(run)
        self.meta = read_adapted_meta(self.run)  # ModelError for a wrong or unfinished run
        self.labels: list[str] = list(self.meta["labels"])
        self.device = device
        self._factory = encoder_factory
        self._encoder: Any = None
        self._lock = threading.Lock()

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["sha256"])

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.run.name, "labels": self.labels,
                "thresholds": None,
                "note": "the adapted model's own head (sigmoid of its logits); an adapt run "
                        "records no decision thresholds"}

    def share_encoder(self, factory: Callable[[], Any]) -> None:
        """Take the encoder from ``factory`` (one with this run's weights) instead of
        loading a second copy."""
        self._factory = factory

    def encoder(self) -> Any:
        with self._lock:
            if self._encoder is None:
                if self._factory is not None:
                    self._encoder = self._factory()
                else:
                    from cxrembed.model import load_encoder

                    self._encoder = load_encoder(checkpoint=self.run, device=self.device)
            return self._encoder

    def logits(self, path: str | os.PathLike) -> np.ndarray:
        """The head's 14 logits for one image file (LABELS order)."""
        import torch

        from cxrembed.data.images import IMAGE_SIZE, decode
        from cxrembed.data.transforms import to_clip_tensor

        encoder = self.encoder()
        pixels = decode(path, size=IMAGE_SIZE)
        with torch.inference_mode():
            embedding = encoder.encode_image(to_clip_tensor(pixels[None]))
            return encoder.head_logits(embedding).float().cpu().numpy()[0]

    def predict_file(self, path: str | os.PathLike) -> dict:
        logits = self.logits(path)
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return {"head": self.describe(),
                "scores": [{"label": name, "score": float(score), "logit": float(logit),
                            "threshold": None, "positive": None}
                           for name, score, logit in zip(self.labels, scores, logits)]}


def load_predictor(head: str | os.PathLike, *, device: str = "cpu",
                   encoder_factory: Callable[[], Any] | None = None) -> RunHeadPredictor:
    """The predictor of a ``--head`` folder (ConfigError naming what was expected)."""
    head = Path(head)
    if not head.is_dir():
        raise ConfigError(f"--head {head}: no such folder; pass an adapt run folder "
                          "(`cxrembed adapt --out RUN`)")
    if (head / "model.json").is_file():
        return RunHeadPredictor(head, device=device, encoder_factory=encoder_factory)
    raise ConfigError(f"--head {head} is not an adapt run folder (no model.json); saved "
                      "heads of `cxrembed fit` are not readable by `serve` yet")
