"""Drawing few-shot samples: K positives per class (+ K "No Finding"), nested over K.

For one seed every class's candidate rows are put in a random order once; the K-shot
sample takes the first K of each order (all when a class has fewer), so the 1-shot
sample is inside the 2-shot sample, and so on. Candidates come from one split only: the
sweep draws training shots from ``train`` and its selection sample from ``val``.
"""

from __future__ import annotations

import numpy as np

from cxrembed.errors import ConfigError


def seeded_rng(*entropy: int) -> np.random.Generator:
    """A generator from a tuple of integers (base seed, draw seed, stream, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def shot_orders(labels: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
                no_finding: bool = True, known: np.ndarray | None = None) -> list[np.ndarray]:
    """For each class (then "No Finding" when asked), its candidate rows in random order.

    Taking the first K of every list gives a K-shot sample; K < K' samples are nested.
    With ``known`` (bool like ``labels``), a class's shots are its *known* positives, and a
    "No Finding" shot has every label known and negative.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    sub = labels[candidates]
    if known is not None:
        sure = np.asarray(known, dtype=bool)[candidates]
        positive = (sub == 1) & sure
        none = sure.all(axis=1) & (sub.sum(axis=1) == 0)
    else:
        positive, none = sub == 1, sub.sum(axis=1) == 0
    orders = [rng.permutation(candidates[positive[:, c]]) for c in range(labels.shape[1])]
    if no_finding:
        orders.append(rng.permutation(candidates[none]))
    return orders


def take_shots(orders: list[np.ndarray], shots: int) -> np.ndarray:
    """The K-shot sample: first ``shots`` of every order, each row once, ascending."""
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    parts = [order[:shots] for order in orders]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def sample_shots(labels: np.ndarray, split: np.ndarray, shots: int, seed: int = 0, *,
                 split_name: str = "train", no_finding: bool = True, base_seed: int = 0
                 ) -> np.ndarray:
    """Rows of one K-shot sample from ``split_name`` (what the sweep draws for one seed)."""
    stream = {"train": 0, "val": 1}.get(split_name, 2)
    candidates = np.flatnonzero(np.asarray(split).astype(str) == split_name)
    orders = shot_orders(np.asarray(labels), candidates, seeded_rng(base_seed, seed, stream),
                         no_finding)
    return take_shots(orders, shots)
