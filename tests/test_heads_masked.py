"""Heads on any label set, with unknown labels left out of their fit."""

from __future__ import annotations

import numpy as np
import pytest

from cxrembed.heads import make_head

DIM, CLASSES = 24, 5
NAMES = ("Lung Opacity", "Pleural Effusion", "Fracture", "Edema", "Support Devices")


def world(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(CLASSES, DIM))
    y = (rng.random((n, CLASSES)) < 0.3).astype(np.uint8)
    x = (rng.normal(size=(n, DIM)) + 2.5 * y @ directions).astype(np.float32)
    known = rng.random(y.shape) > 0.25
    text = {name: (directions[c][None], -directions[c][None]) for c, name in enumerate(NAMES)}
    return x, y, known, text


def _head(name, text):
    options = {"epochs": 5} if name == "mlp" else {}
    if name == "tip":
        return make_head("tip", text=text, seed=0, alphas=(1.0,), betas=(5.0,))
    return make_head(name, seed=0, **options)


@pytest.mark.parametrize("name", ["linear", "knn", "tip", "mlp"])
def test_unknown_labels_do_not_move_a_fit(name):
    """Flipping the labels under the mask changes nothing; flipping them unmasked does."""
    x, y, known, text = world()
    train, test = slice(0, 200), slice(200, 400)
    flipped = y.copy()
    flipped[train][~known[train]] ^= 1
    a = _head(name, text).fit(x[train], y[train], known=known[train]).predict(x[test])
    b = _head(name, text).fit(x[train], flipped[train], known=known[train]).predict(x[test])
    assert a.shape == (200, CLASSES)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = _head(name, text).fit(x[train], flipped[train]).predict(x[test])
    assert not np.allclose(a, c, atol=1e-6)
