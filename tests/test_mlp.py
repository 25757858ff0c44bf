"""The few-shot MLP trainer's parts: the per-member val AUC it selects epochs with, and a
head that trains without loading open_clip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cxrembed.heads.base import val_mean_auc, val_mean_aucs_each


def _sklearn_mean_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y[:, c], s[:, c]) for c in range(y.shape[1])
            if 0 < y[:, c].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def test_val_mean_aucs_each_equals_sklearn_per_member():
    """Members of different sizes in one pass: each one's mean AUC over the classes it can
    score, ties counted one half, NaN for a member that can score none."""
    rng = np.random.default_rng(0)
    labels, scores = [], []
    for n in (3, 40, 17, 61):
        labels.append((rng.random((n, 14)) < 0.25).astype(np.uint8))
        scores.append(np.round(rng.normal(size=(n, 14)), 1))  # many ties
    labels[1][:, 4] = 0  # a class without positives in one member
    labels.append(np.zeros((6, 14), np.uint8))  # nothing to score
    scores.append(rng.normal(size=(6, 14)))
    got = val_mean_aucs_each(labels, scores)
    expected = [_sklearn_mean_auc(y, s) for y, s in zip(labels, scores)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.isnan(got[-1])
    # the same value, bit for bit, as the one-member function the other heads use
    np.testing.assert_array_equal(got, [val_mean_auc(y, s) for y, s in zip(labels, scores)])


def test_mlp_head_trains_and_predicts_without_loading_open_clip():
    """The few-shot MLP reuses model.head's architecture; loading it must not pull in
    open_clip, torchvision and timm (seconds of CPU in every sweep)."""
    pytest.importorskip("torch")
    script = (
        "import sys, numpy as np\n"
        "from cxrembed.heads import make_head\n"
        "x = np.random.default_rng(0).normal(size=(40, 512)).astype(np.float32)\n"
        "y = np.zeros((40, 14), np.uint8); y[::3, 0] = 1\n"
        "scores = make_head('mlp', seed=1, epochs=1).fit(x, y, x, y).predict(x)\n"
        "assert scores.shape == (40, 14)\n"
        "print(sorted(m for m in ('open_clip', 'timm', 'torchvision') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
