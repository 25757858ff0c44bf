"""Heads you keep: a fitted head, its calibration and thresholds, in a folder.

A head folder holds ``head.json`` (the card: head kind, hyper-parameters and what val
chose, the store's encoder fingerprint and how to load that encoder, label names, the
training rows' ids, val metrics, calibration and thresholds) and ``head.npz`` (its
arrays). Load it with :func:`load_head`; :meth:`SavedHead.predict` takes the encoder's raw
image vectors and returns calibrated probabilities and positive/negative calls::

    head = load_head("heads/linear-16")
    encoder = head.load_encoder("cpu")   # the encoder it was fitted for, checked
    out = head.predict(vectors)          # vectors: (n, D) raw encoder output
    out.probability, out.positive        # (n, C) float64, (n, C) bool

Arrays by kind: ``linear`` its coefficients; ``mlp`` and ``adapted`` the MLP's weights;
``knn`` and ``tip`` the shots' unit vectors and labels (plus, for ``tip``, the class text
vectors); ``zeroshot`` the class text vectors. A head is rebuilt through its public
constructor and ``fit`` where that reproduces it exactly (knn, tip with the chosen
alpha/beta, zeroshot), and by loading its fitted parameters otherwise.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.calibration import ClassCalibration, uncalibrated
from cxrembed.errors import ConfigError, StoreError
from cxrembed.files import atomic_write, atomic_write_text

CARD = "head.json"
ARRAYS = "head.npz"
CARD_FORMAT = "cxrembed-head"
CARD_VERSION = 1
#: What a head's scores are: logits (probability = sigmoid) or already in [0, 1].
SCORE_KIND = {"linear": "logit", "mlp": "logit", "tip": "logit", "adapted": "logit",
              "knn": "probability", "zeroshot": "probability"}


@dataclass
class HeadPrediction:
    """Per image and class: the head's score, calibrated probability, positive call."""

    scores: np.ndarray  # (n, C) float64
    probability: np.ndarray  # (n, C) float64; NaN for a class without calibration
    positive: np.ndarray  # (n, C) bool, score >= the class's threshold


class AdaptedHead:
    """The adapted run's own MLP head as a head (raw vectors in, logits out)."""

    name = "adapted"
    input = "raw"

    def __init__(self, state: dict[str, Any]) -> None:
        import torch

        from cxrembed.model.head import DiagnosisHead

        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        weights = [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]
        first, last = tensors[weights[0]], tensors[weights[-1]]
        hidden = (int(tensors[weights[0]].shape[0]), int(tensors[weights[1]].shape[0]))
        self.module = DiagnosisHead(in_dim=int(first.shape[1]), hidden=hidden,
                                    num_classes=int(last.shape[0]))
        self.module.load_state_dict(tensors)
        self.module.eval()
        self.selected: dict[str, Any] = {}

    def predict(self, X: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.as_tensor(np.asarray(X, dtype=np.float32))).double().numpy()


def _module_arrays(module: Any) -> dict[str, np.ndarray]:
    return {f"module.{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def export_head(kind: str, head: Any, train: tuple[np.ndarray, np.ndarray] | None,
                text: Any = None) -> dict[str, np.ndarray]:
    """The arrays that rebuild a fitted head (see the module doc)."""
    from cxrembed.heads.zeroshot import class_text_vectors

    if kind == "linear":
        return {"coef": head.coef_, "intercept": head.intercept_}
    if kind in ("mlp", "adapted"):
        return _module_arrays(head.module)
    if kind == "zeroshot":
        return {"text_pos": head.pos, "text_neg": head.neg}
    if kind in ("knn", "tip"):
        X, Y = train
        unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        arrays = {"shots": unit.astype(np.float32), "shot_labels": Y.astype(np.uint8)}
        if kind == "tip":
            arrays["text_pos"], arrays["text_neg"] = class_text_vectors(text)
        return arrays
    raise ConfigError(f"cannot save a head of kind {kind!r}")


def rebuild_head(kind: str, arrays: dict[str, np.ndarray], options: dict[str, Any],
                 selected: dict[str, Any], label_names: list[str]) -> Any:
    """A head equal to the saved one, from its arrays (inverse of :func:`export_head`)."""
    from cxrembed.heads import make_head

    def text() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (arrays["text_pos"][c][None], arrays["text_neg"][c][None])
                for c, name in enumerate(label_names)}

    if kind == "adapted":
        return AdaptedHead({k[len("module."):]: v for k, v in arrays.items()
                            if k.startswith("module.")})
    if kind == "zeroshot":
        head = make_head("zeroshot", text=text(), **options)
    elif kind == "tip":
        chosen = {**options, "default_alpha": selected["alpha"], "default_beta": selected["beta"]}
        head = make_head("tip", text=text(), **chosen).fit(arrays["shots"], arrays["shot_labels"])
    elif kind == "knn":
        head = make_head("knn", **options).fit(arrays["shots"], arrays["shot_labels"])
    elif kind == "linear":
        head = make_head("linear", **options)
        head.coef_, head.intercept_ = arrays["coef"], arrays["intercept"]
    elif kind == "mlp":
        import torch

        from cxrembed.model.head import DiagnosisHead as PaperHead

        head = make_head("mlp", **options)
        state = {k[len("module."):]: torch.as_tensor(v) for k, v in arrays.items()
                 if k.startswith("module.")}
        head.module = PaperHead(in_dim=int(state["0.weight"].shape[1]))
        head.module.load_state_dict(state)
        head.module.eval()
    else:
        raise ConfigError(f"unknown saved head kind {kind!r}")
    head.selected = dict(selected)
    return head


@dataclass
class SavedHead:
    """A fitted head with its card; :meth:`predict` gives calibrated decisions."""

    kind: str
    head: Any
    card: dict[str, Any]
    calibration: dict[str, ClassCalibration] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        return list(self.card["label_names"])

    @property
    def fingerprint(self) -> dict:
        return self.card["fingerprint"]

    @property
    def load_args(self) -> dict | None:
        return self.card.get("load_args")

    def load_encoder(self, device: str = "auto", encoder: Any = None) -> Any:
        """The encoder this head was fitted for, loaded from the card (or ``encoder``,
        checked): StoreError when its fingerprint is not the card's."""
        from cxrembed.store import check_same_encoder

        if encoder is None:
            from cxrembed.model import load_encoder

            if not self.load_args:
                raise ConfigError("the head's card does not record how to load its encoder; "
                                  "pass the encoder yourself")
            encoder = load_encoder(**self.load_args, device=device)
        check_same_encoder(self.fingerprint, encoder,
                           what=("the head's encoder (from its card)", "the encoder loaded"))
        return encoder

    def scores(self, vectors: Any) -> np.ndarray:
        """``(n, C)`` head scores of raw encoder vectors (unit-normalised where the head
        works on unit vectors, exactly as the sweep does)."""
        raw = np.asarray(vectors, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != int(self.card["embed_dim"]):
            raise ConfigError(f"vectors of shape {raw.shape}; this head takes "
                              f"(n, {self.card['embed_dim']}) raw encoder vectors")
        if self.head.input != "raw":
            raw = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        return np.asarray(self.head.predict(raw), dtype=np.float64)

    def predict(self, vectors: Any) -> HeadPrediction:
        """Scores, calibrated probabilities and positive calls at the stored thresholds."""
        scores = self.scores(vectors)
        prob = np.empty_like(scores)
        positive = np.zeros(scores.shape, dtype=bool)
        for c, name in enumerate(self.label_names):
            cal = self.calibration.get(name)
            if cal is None:
                prob[:, c] = uncalibrated(scores[:, c], SCORE_KIND[self.kind])
                continue
            prob[:, c] = cal.probability(scores[:, c])
            positive[:, c] = cal.decide(scores[:, c])
        return HeadPrediction(scores, prob, positive)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``head.json`` and ``head.npz`` into ``folder`` (each atomically)."""
        from cxrembed.fewshot.results import to_jsonable

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        card = dict(self.card)
        card["calibration"] = {**card.get("calibration", {}), "classes": {
            name: cal.to_dict() for name, cal in self.calibration.items()}}
        def write_arrays(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez adds no second suffix
                np.savez(f, **self.arrays)

        atomic_write(folder / ARRAYS, write_arrays)
        text = json.dumps(card, indent=2, default=to_jsonable, allow_nan=False)
        atomic_write_text(folder / CARD, text + "\n")
        self.card = card
        return folder


def load_head(path: str | os.PathLike) -> SavedHead:
    """A saved head folder (``cxrembed fit``), or an adapt run folder (its own head,
    uncalibrated: no thresholds until ``cxrembed fit STORE --head adapted``)."""
    folder = Path(path)
    if (folder / CARD).is_file():
        return _load_card(folder)
    if (folder / "model.json").is_file():
        return _from_run(folder)
    raise ConfigError(f"{folder} is neither a head folder ({CARD}: made by `cxrembed fit`) "
                      "nor an adapt run folder (model.json)")


def _load_card(folder: Path) -> SavedHead:
    """A head folder read back; a card or arrays that are malformed or disagree (edited,
    damaged, from another version) are one ConfigError, checked by scoring a probe row."""
    try:
        card = json.loads((folder / CARD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"head card {folder / CARD} is not valid JSON: {exc}") from None
    if (not isinstance(card, dict) or card.get("format") != CARD_FORMAT
            or card.get("format_version") != CARD_VERSION):
        raise ConfigError(f"{folder / CARD} is not a cxrembed head card of version "
                          f"{CARD_VERSION}; refit it with `cxrembed fit`")
    _check_card(card, folder / CARD)
    if not (folder / ARRAYS).is_file():
        raise ConfigError(f"head folder {folder} lacks {ARRAYS}; refit it with `cxrembed fit`")
    try:
        with np.load(folder / ARRAYS) as npz:  # allow_pickle stays False: arrays only
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read {folder / ARRAYS}: {exc}; refit the head with "
                          "`cxrembed fit`") from None
    try:
        head = rebuild_head(card["kind"], arrays, card.get("options", {}),
                            card.get("selected", {}), card["label_names"])
        classes = card.get("calibration", {}).get("classes", {})
        calibration = {name: ClassCalibration.from_dict(d) for name, d in classes.items()}
        saved = SavedHead(card["kind"], head, card, calibration, arrays)
        probe = saved.predict(np.zeros((1, card["embed_dim"]), np.float32))
    except ConfigError as exc:
        raise ConfigError(f"head folder {folder} cannot be used: {exc}") from None
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
        raise ConfigError(f"head folder {folder} is damaged or its card and arrays disagree "
                          f"({type(exc).__name__}: {str(exc)[:200]}); refit it with "
                          "`cxrembed fit`") from None
    if probe.scores.shape != (1, len(card["label_names"])):
        raise ConfigError(f"head folder {folder}: its head scores {probe.scores.shape[1]} "
                          f"classes but its card names {len(card['label_names'])}; refit it")
    return saved


def _check_card(card: dict[str, Any], where: Path) -> None:
    """The card's fields every use relies on, with their types."""
    checks = [
        ("kind", isinstance(card.get("kind"), str) and card["kind"] in SCORE_KIND,
         f"one of {', '.join(SCORE_KIND)}"),
        ("label_names", isinstance(card.get("label_names"), list) and card["label_names"]
         and all(isinstance(n, str) for n in card["label_names"]), "a list of class names"),
        ("embed_dim", isinstance(card.get("embed_dim"), int)
         and not isinstance(card["embed_dim"], bool) and card["embed_dim"] >= 1,
         "a whole number >= 1"),
        ("fingerprint", isinstance(card.get("fingerprint"), dict), "an object"),
        ("options", isinstance(card.get("options", {}), dict), "an object"),
        ("selected", isinstance(card.get("selected", {}), dict), "an object"),
        ("calibration", isinstance(card.get("calibration", {}), dict)
         and isinstance(card.get("calibration", {}).get("classes", {}), dict)
         and all(isinstance(v, dict) for v in card.get("calibration", {})
                 .get("classes", {}).values()), "an object with per-class objects"),
        ("load_args", card.get("load_args") is None or isinstance(card["load_args"], dict),
         "an object or null"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"head card {where}: {name} is {str(card.get(name))[:60]}, "
                              f"expected {expected}; refit the head with `cxrembed fit`")


def _from_run(run: Path) -> SavedHead:
    from cxrembed.model import load_encoder

    encoder = load_encoder(checkpoint=run)
    if not encoder.has_head:
        raise StoreError(f"run {run} has no head")
    state = {k: v.numpy() for k, v in encoder.head_state_dict().items()}
    arrays = {f"module.{k}": v for k, v in state.items()}
    card = {"format": CARD_FORMAT, "format_version": CARD_VERSION, "kind": "adapted",
            "options": {}, "selected": {}, "fingerprint": encoder.fingerprint,
            "load_args": encoder.load_args,
            # the run's own classes, in its head's order (its data's label set)
            "label_names": list(encoder.label_names), "vocabulary": encoder.vocabulary,
            "embed_dim": encoder.embed_dim, "input": "raw", "score_kind": "logit",
            "calibration": {"method": "none", "note": "the run's head as trained: no "
                            "calibration or thresholds; fit them with `cxrembed fit STORE "
                            "--head adapted`"}}
    return SavedHead("adapted", AdaptedHead(state), card, {}, arrays)
