"""Drawing few-shot samples: K positives per class (+ K "No Finding"), nested over K.

For one seed every class's candidate rows are put in a random order once; the K-shot
sample takes the first K of each order (all when a class has fewer), so the 1-shot
sample is inside the 2-shot sample, and so on. Candidates come from one split only: the
sweep draws training shots from ``train`` and its selection sample from ``val``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def sample_shots(labels: np.ndarray, split: np.ndarray, shots: int | Sequence[int],
                 seed: int = 0, *, split_name: str = "train", no_finding: bool = True,
                 base_seed: int = 0, known: np.ndarray | None = None
                 ) -> np.ndarray | list[np.ndarray]:
    """Rows of the K-shot sample from ``split_name`` for one seed: what the sweep draws.

    ``shots`` one count gives one array; a sequence gives one array per count, nested
    (drawn from the same class orders), as the sweep uses them. ``known``: see
    :func:`shot_orders`.
    """
    stream = {"train": 0, "val": 1}.get(split_name, 2)
    candidates = np.flatnonzero(np.asarray(split).astype(str) == split_name)
    orders = shot_orders(np.asarray(labels), candidates, seeded_rng(base_seed, seed, stream),
                         no_finding, known)
    if isinstance(shots, (int, np.integer)):
        return take_shots(orders, int(shots))
    return [take_shots(orders, int(k)) for k in shots]


def class_supply(labels: np.ndarray, split: np.ndarray, split_name: str = "train",
                 no_finding: bool = True, names: Sequence[str] | None = None,
                 known: np.ndarray | None = None) -> dict[str, int]:
    """Candidates per class in ``split_name`` (and "No Finding" when drawn): the most
    shots each class can give, counted as :func:`shot_orders` draws them (with ``known``,
    only known positives, and "No Finding" only where every label is known).
    ``names``: the label names (default: NIH's 14)."""
    from cxrembed.labels import LABELS, NO_FINDING

    rows = np.asarray(split).astype(str) == split_name
    sub = np.asarray(labels)[rows]
    if known is not None:
        sure = np.asarray(known, dtype=bool)[rows]
        positive, none = (sub == 1) & sure, sure.all(axis=1) & (sub.sum(axis=1) == 0)
    else:
        positive, none = sub == 1, sub.sum(axis=1) == 0
    supply = {name: int(n) for name, n in zip(names or LABELS, positive.sum(axis=0))}
    if no_finding:
        supply[NO_FINDING] = int(none.sum())
    return supply


def check_shots(shots: Sequence[int], supply: dict[str, int], split_name: str = "train",
                refuse: bool = True) -> list[dict[str, int | str]]:
    """Refuse shot counts no class can supply; list the classes short of each other count.

    A K larger than every class's candidate count draws every candidate of every class,
    the same sample as a smaller K: a point of the curve that is not what it says, so it
    is refused (with ``refuse``; the val selection sample is only reported). A class with fewer candidates than K gives all it has (the protocol);
    each such (shots, class) is returned so the result can say so.
    """
    most = max(supply.values(), default=0)
    too_many = [k for k in shots if k > most]
    if too_many and refuse:
        biggest = max(supply, key=supply.get) if supply else "(none)"
        raise ConfigError(
            f"--shots {','.join(map(str, too_many))}: the {split_name} split has at most "
            f"{most} images of one class ({biggest}), so no class can give that many shots; "
            f"use shot counts up to {most}")
    return [{"split": split_name, "shots": int(k), "class": name, "available": n}
            for k in shots for name, n in supply.items() if n < k]


def describe_shortfall(shortfall: list[dict[str, int | str]]) -> list[str]:
    """One line per (split, class) short of some shot counts, for logs and the CLI."""
    grouped: dict[tuple[str, str], tuple[int, list[int]]] = {}
    for row in shortfall:
        key = (str(row["split"]), str(row["class"]))
        grouped.setdefault(key, (int(row["available"]), []))[1].append(int(row["shots"]))
    return [f"{name}: only {n} {split} image{'s' if n != 1 else ''}, fewer than "
            f"{', '.join(map(str, ks))} shots: {'all of them are' if n else 'none is'} used"
            for (split, name), (n, ks) in grouped.items()]
