"""The one interface every head follows, and the registry of heads by name.

A head maps image vectors to one score per class::

    head = make_head("linear", seed=0)
    head.fit(X, Y, X_val, Y_val)      # X (n, D) float, Y (n, 14) 0/1; val optional
    scores = head.predict(X_test)     # (m, 14) float64, higher = more likely positive

``fit`` may use the val pair for its own choices (C, alpha/beta, epoch) and for nothing
else; it never sees test rows. What it chose is in ``head.selected`` (JSON-able).
``head.input`` says which vectors it expects: ``"normalized"`` (unit vectors, cosine
geometry) or ``"raw"`` (the encoder's output, what the adapted head was trained on).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from cxrembed.errors import ConfigError, DataError


@runtime_checkable
class Head(Protocol):
    """What the few-shot sweep needs from a head."""

    name: ClassVar[str]
    input: ClassVar[str]
    selected: dict[str, Any]

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None = None,
            Y_val: np.ndarray | None = None) -> "Head": ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


HEADS: dict[str, type] = {}


def register_head(name: str):
    """Class decorator: make a head available to :func:`make_head` under ``name``."""
    def decorate(cls: type) -> type:
        cls.name = name
        HEADS[name] = cls
        return cls
    return decorate


def available_heads() -> list[str]:
    """Names :func:`make_head` accepts."""
    _load_builtin_heads()
    return sorted(HEADS)


def _load_builtin_heads() -> None:
    # Importing registers them; done lazily so `cxrembed.heads.base` stays light.
    from cxrembed.heads import knn, linear, mlp, tip, zeroshot  # noqa: F401


def make_head(name: str, **options: Any) -> Head:
    """A new, unfitted head by name; options are its constructor's keyword arguments.

    Unknown names and unknown options raise ConfigError listing the valid ones.
    """
    _load_builtin_heads()
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; expected one of: {', '.join(sorted(HEADS))}")
    cls = HEADS[name]
    try:
        return cls(**options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"head {name!r}: {exc}") from None


def build_config(config_cls: type, options: dict[str, Any], head: str) -> Any:
    """A head's config dataclass from ``options``, refusing unknown keys by name."""
    from cxrembed.config import from_mapping

    return from_mapping(config_cls, options, f"{head} head")


def check_xy(X: Any, Y: Any | None = None, what: str = "X") -> tuple[np.ndarray, np.ndarray | None]:
    """Validated float32 ``X`` (n, D) and uint8 ``Y`` (n, C), any number of classes."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or not len(X):
        raise DataError(f"{what} must be a non-empty (n, D) array, got shape {X.shape}")
    if not np.isfinite(X.sum(dtype=np.float64)):  # one pass, no (n, D) mask
        raise DataError(f"{what} holds non-finite values")
    if Y is None:
        return X, None
    Y = np.asarray(Y)
    if Y.ndim != 2 or len(Y) != len(X) or not Y.shape[1]:
        raise DataError(f"labels for {what} must be ({len(X)}, classes), got {Y.shape}")
    if not np.isin(Y, (0, 1)).all():
        raise DataError(f"labels for {what} must be 0/1")
    return X, Y.astype(np.uint8)


def check_known(known: Any, Y: np.ndarray) -> np.ndarray | None:
    """The known-label mask of ``Y`` as bool (n, C), or None when every label is known.

    A head leaves an unknown label out of its fit: it is neither a positive nor a negative
    of that class for that shot (CheXpert's uncertain under ``--uncertain ignore``)."""
    if known is None:
        return None
    mask = np.asarray(known, dtype=bool)
    if mask.shape != Y.shape:
        raise DataError(f"known-label mask {mask.shape} does not match labels {Y.shape}")
    return None if mask.all() else mask


def val_mean_auc(Y_val: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUC over the classes the val sample can score (quiet; NaN if none)."""
    return float(val_mean_aucs(Y_val, [scores])[0])


def val_mean_aucs(Y_val: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """:func:`val_mean_auc` of each candidate score matrix, all in one vectorised pass
    (the heads' choices of C, alpha/beta and epoch score tens of candidates)."""
    from cxrembed.metrics import weighted_aucs

    Y_val = np.asarray(Y_val).astype(bool)
    n, n_classes = Y_val.shape
    scores = np.concatenate([np.asarray(c, dtype=np.float64) for c in candidates], axis=1)
    auc = weighted_aucs(np.tile(Y_val, (1, len(candidates))), scores, np.arange(n),
                        np.ones((n, 1), np.float32))[0].reshape(len(candidates), n_classes)
    defined = ~np.isnan(auc)
    with np.errstate(invalid="ignore"):
        return np.where(defined.any(axis=1), np.nansum(auc, axis=1) / defined.sum(axis=1),
                        np.nan)


def val_mean_aucs_each(labels: list[np.ndarray], scores: list[np.ndarray]) -> np.ndarray:
    """:func:`val_mean_auc` of each ``(labels[i], scores[i])`` pair (samples of different
    sizes, one class count), in one rank pass: the few-shot MLP checks every member's val
    sample each epoch. Ties count one half (midranks), as in :func:`val_mean_auc`."""
    n_classes = labels[0].shape[1]
    longest = max(len(y) for y in labels)
    padded = np.full((longest, len(labels) * n_classes), np.inf)  # ranked above every row
    positive = np.zeros(padded.shape, dtype=bool)
    rows = np.zeros(padded.shape[1])
    for i, (y, s) in enumerate(zip(labels, scores)):
        cols = slice(i * n_classes, (i + 1) * n_classes)
        padded[:len(y), cols], positive[:len(y), cols], rows[cols] = s, y, len(y)
    ranks = _midranks(padded)
    pos = positive.sum(axis=0).astype(np.float64)
    pairs = pos * (rows - pos)
    u = np.where(positive, ranks, 0.0).sum(axis=0) - pos * (pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, u / np.where(pairs > 0, pairs, 1.0), np.nan)
        auc = auc.reshape(len(labels), n_classes)
        defined = ~np.isnan(auc)
        return np.where(defined.any(axis=1), np.nansum(auc, axis=1) / defined.sum(axis=1),
                        np.nan)


def _midranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of each column's values, ties given their mean rank."""
    order = np.argsort(scores, axis=0, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=0)
    index = np.arange(len(scores))[:, None]
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, index, len(scores))[::-1], axis=0)[::-1]
    ranks = np.empty(scores.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks


def has_val(X_val: Any, Y_val: Any) -> bool:
    """True when a val pair is given and can score at least one class."""
    if X_val is None or Y_val is None or not len(Y_val):
        return False
    Y_val = np.asarray(Y_val)
    pos = Y_val.sum(axis=0)
    return bool(((pos > 0) & (pos < len(Y_val))).any())


def inverse_norms(X: np.ndarray) -> np.ndarray:
    """``1 / |x|`` per row, float32 ``(n, 1)`` (rows of zeros get 1)."""
    sq = np.einsum("ij,ij->i", X, X)
    return (1.0 / np.sqrt(np.where(sq > 0, sq, 1.0))).astype(np.float32)[:, None]


def unit_rows(X: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Rows scaled to unit length, C-contiguous ``dtype``; rows of zeros stay zero. Input
    whose rows are already unit (within 1e-4) is returned as is when its dtype matches
    (no copy): the sweep hands heads unit vectors."""
    X = np.asarray(X)
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    if X.dtype == dtype and np.all(np.abs(sq - 1.0) < 2e-4):
        return np.ascontiguousarray(X)
    scale = 1.0 / np.sqrt(np.where(sq > 0, sq, 1.0))
    return np.ascontiguousarray(X * scale[:, None].astype(dtype), dtype=dtype)


def cosine(X: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(n, k)`` float32 of rows of ``X`` (any norm) with unit vectors
    ``(k, D)``; normalises the small result, not the large input."""
    out = X @ np.asarray(unit, dtype=np.float32).T
    out *= inverse_norms(X)
    return out


def torch_device(name: Any) -> Any:
    """A torch device by name (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch.device),
    through :func:`cxrembed.device.resolve_device`: ``auto`` takes a GPU only when there is
    one, and CUDA asked for where torch sees none is refused (never a silent CPU run in
    place of the GPU asked for)."""
    from cxrembed.device import resolve_device

    return resolve_device(name)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One BLAS and one torch thread inside: fitting on a few hundred shots is a stream of
    tiny matrix products, which extra threads slow down (several times over when other
    processes share the cores). Restores both settings on exit."""
    with thread_limit(1):
        yield


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """At most ``threads`` BLAS and torch threads inside; both settings restored on exit.
    Never imports torch itself (only when it is loaded)."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(max(1, int(threads)))
        with threadpool_limits(max(1, int(threads))):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)
