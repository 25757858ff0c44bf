"""AUC and patient-level bootstrap, checked against sklearn and brute-force references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrembed.errors import ConfigError, DataError
from cxrembed.labels import LABELS, NIH_PREVALENCE
from cxrembed.metrics import (UndefinedAUCWarning, bootstrap_auc, mean_auc, per_class_auc,
                              replicate_aucs, resample_patients)


def planted(n: int, seed: int = 0, signal: float = 1.0, patients: int | None = None):
    """Labels at NIH-like prevalence, scores = signal * label + noise, patient ids."""
    rng = np.random.default_rng(seed)
    prevalence = np.clip(np.array(NIH_PREVALENCE) * 3, 0.02, 0.5)
    y = (rng.random((n, 14)) < prevalence).astype(np.uint8)
    y[:2] = [[1] * 14, [0] * 14]  # every class has both values
    scores = signal * y + rng.normal(size=(n, 14))
    pid = rng.integers(0, patients or max(n // 4, 2), n)
    return y, scores, pid


def test_auc_equals_sklearn_with_ties_and_integer_scores():
    y, scores, _ = planted(3000, seed=1)
    scores[:, :5] = np.round(scores[:, :5], 1)  # many ties
    scores[:, 5] = (scores[:, 5] > 0).astype(int)  # two score values only
    auc = per_class_auc(y, scores)
    reference = [roc_auc_score(y[:, c], scores[:, c]) for c in range(14)]
    np.testing.assert_allclose(auc, reference, rtol=0, atol=1e-12)


def test_auc_one_dimensional_and_perfect_and_inverted():
    y = np.array([0, 0, 1, 1])
    assert per_class_auc(y, [0.1, 0.2, 0.3, 0.4])[0] == 1.0
    assert per_class_auc(y, [0.4, 0.3, 0.2, 0.1])[0] == 0.0
    assert per_class_auc(y, [0.5, 0.5, 0.5, 0.5])[0] == 0.5  # all tied: half credit


def test_undefined_class_is_nan_with_warning_and_left_out_of_mean():
    y, scores, _ = planted(500, seed=2)
    y[:, 3] = 0  # Pneumothorax: no positives
    y[:, 13] = 1  # Hernia: no negatives
    with pytest.warns(UndefinedAUCWarning, match="Pneumothorax.*Hernia"):
        auc = per_class_auc(y, scores)
    assert np.isnan(auc[3]) and np.isnan(auc[13])
    assert not np.isnan(np.delete(auc, [3, 13])).any()
    assert 0.5 not in auc[[3, 13]]
    with pytest.warns(UndefinedAUCWarning, match="12 of 14"):
        mean = mean_auc(auc)
    assert mean == pytest.approx(np.delete(auc, [3, 13]).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_auc([np.nan, np.nan], warn=False))


@pytest.mark.parametrize("bad", ["nan", "label", "shape"])
def test_bad_input_is_a_data_error(bad):
    y, scores, _ = planted(50)
    if bad == "nan":
        scores[3, 4] = np.nan
    elif bad == "label":
        y = y.astype(int)
        y[0, 0] = 2
    else:
        scores = scores[:, :13]
    with pytest.raises(DataError):
        per_class_auc(y, scores)


def test_replicates_equal_sklearn_with_patient_weights():
    """A resample = every row of each drawn patient, as many times as the patient is drawn."""
    y, scores, pid = planted(400, seed=3, patients=60)
    scores[:, 0] = np.round(scores[:, 0])  # ties too
    index = np.unique(pid, return_inverse=True)[1]
    weights = resample_patients(index.max() + 1, 20, seed=5)
    assert (weights.sum(axis=0) == index.max() + 1).all()  # P patients drawn per resample
    point, reps = replicate_aucs(y, scores, index, weights)
    np.testing.assert_allclose(point, per_class_auc(y, scores), atol=1e-12)
    for b in range(20):
        w = weights[index, b]
        for c in range(14):
            keep = w > 0
            if len(np.unique(y[keep, c])) < 2:
                assert np.isnan(reps[b, c])
                continue
            expected = roc_auc_score(y[keep, c], scores[keep, c], sample_weight=w[keep])
            assert reps[b, c] == pytest.approx(expected, abs=1e-12)


def test_replicates_equal_a_brute_force_loop_over_resampled_rows():
    """Each resample materialised as rows (a patient drawn twice: its rows twice) and scored
    by sklearn, one resample at a time, against the one-product formulation."""
    y, scores, pid = planted(300, seed=11, patients=40)
    scores[:, 2] = np.round(scores[:, 2] * 2)  # ties
    y[:, 13] = 0
    y[:3, 13] = 1  # a rare class: undefined in some resamples
    index = np.unique(pid, return_inverse=True)[1]
    weights = resample_patients(index.max() + 1, 30, seed=2)
    point, reps = replicate_aucs(y, scores, index, weights)
    assert np.isnan(reps[:, 13]).any() and not np.isnan(reps[:, 13]).all()
    # the torch path (what `fewshot --device cuda` runs), here on the CPU: the same numbers
    point_t, reps_t = replicate_aucs(y, scores, index, weights, device="cpu")
    np.testing.assert_allclose(reps_t, reps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(point_t, point, rtol=0, atol=1e-12)
    for b in range(30):
        rows = np.concatenate([np.repeat(np.flatnonzero(index == p), int(k))
                               for p, k in enumerate(weights[:, b]) if k])
        for c in range(14):
            if len(np.unique(y[rows, c])) < 2:
                assert np.isnan(reps[b, c])
            else:
                expected = roc_auc_score(y[rows, c], scores[rows, c])
                assert reps[b, c] == pytest.approx(expected, abs=1e-12)  # sklearn's rounding
    np.testing.assert_allclose(point, [roc_auc_score(y[:, c], scores[:, c]) for c in range(14)],
                               atol=1e-12, rtol=0)


def test_rows_of_one_patient_move_together():
    """Ten identical rows per patient resample exactly like one row per patient: the whole
    cluster is drawn or not (a row-level bootstrap would give intervals ~3x narrower)."""
    y, scores, _ = planted(300, seed=4)
    single = bootstrap_auc(y, scores, np.arange(300), n_resamples=300, seed=9)
    tenfold = bootstrap_auc(np.repeat(y, 10, axis=0), np.repeat(scores, 10, axis=0),
                            np.repeat(np.arange(300), 10), n_resamples=300, seed=9)
    np.testing.assert_allclose(tenfold.low, single.low, atol=1e-12)
    np.testing.assert_allclose(tenfold.high, single.high, atol=1e-12)
    assert tenfold.mean_low == pytest.approx(single.mean_low)
    # Row-level resampling of the tenfold data would be much narrower: check it differs.
    rows = bootstrap_auc(np.repeat(y, 10, axis=0), np.repeat(scores, 10, axis=0),
                         np.arange(3000), n_resamples=300, seed=9)
    assert (rows.mean_high - rows.mean_low) < 0.6 * (tenfold.mean_high - tenfold.mean_low)


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    small = bootstrap_auc(*planted(400, seed=5), n_resamples=500, seed=0)
    large = bootstrap_auc(*planted(6400, seed=5), n_resamples=500, seed=0)
    for ci in (small, large):
        assert (ci.low <= ci.auc).all() and (ci.auc <= ci.high).all()
        assert ci.mean_low <= ci.mean_auc <= ci.mean_high
        assert ci.n_resamples == 500 and ci.level == 0.95
    width_small = small.high - small.low
    width_large = large.high - large.low
    assert np.median(width_large / width_small) < 0.4  # 16x data: about 1/4 the width
    assert (large.mean_high - large.mean_low) < 0.4 * (small.mean_high - small.mean_low)


@pytest.mark.filterwarnings("ignore::cxrembed.metrics.UndefinedAUCWarning")
def test_bootstrap_is_seeded_and_reports_as_json():
    data = planted(500, seed=6)
    a = bootstrap_auc(*data, n_resamples=200, seed=1)
    b = bootstrap_auc(*data, n_resamples=200, seed=1)
    c = bootstrap_auc(*data, n_resamples=200, seed=2)
    np.testing.assert_array_equal(a.low, b.low)
    assert not np.array_equal(a.low, c.low)
    out = a.to_dict()
    assert set(out["per_class"]) == set(LABELS)
    assert out["bootstrap"]["unit"] == "patient" and out["bootstrap"]["n_resamples"] == 200
    with pytest.raises(ConfigError):
        bootstrap_auc(*data, n_resamples=0)


def test_undefined_class_in_bootstrap_is_nan_not_half():
    y, scores, pid = planted(300, seed=7)
    y[:, 6] = 0
    with pytest.warns(UndefinedAUCWarning):
        ci = bootstrap_auc(y, scores, pid, n_resamples=100)
    assert np.isnan(ci.auc[6]) and np.isnan(ci.low[6]) and np.isnan(ci.high[6])
    assert ci.to_dict()["per_class"]["Fibrosis"]["auc"] is None
    assert ci.mean_auc == pytest.approx(np.nanmean(ci.auc))


# ---------------------------------------------------------------------------------------
# Any label set, with unknown labels left out


def masked_labels(n: int = 900, classes: int = 5, seed: int = 3):
    """A non-NIH label set (5 classes) with ~20% unknown cells, scores with signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < 0.3).astype(np.uint8)
    known = rng.random((n, classes)) > 0.2
    if classes > 1:
        known[:, 0] = True  # one fully known class
    y[~known] = rng.integers(0, 2, (~known).sum())  # what is under the mask must not matter
    scores = y + rng.normal(size=y.shape)
    scores[:, -1] = np.round(scores[:, -1], 1)  # ties
    return y, scores, known, rng.integers(0, n // 3, n)


@pytest.mark.parametrize("classes", [1, 5, 13])
def test_masked_auc_equals_sklearn_on_the_known_rows(classes):
    y, scores, known, _ = masked_labels(classes=classes)
    auc = per_class_auc(y, scores, known=known)
    reference = [roc_auc_score(y[known[:, c], c], scores[known[:, c], c])
                 for c in range(classes)]
    np.testing.assert_allclose(auc, reference, rtol=0, atol=1e-12)
    # the mask changes the answer: unknown cells are not negatives
    assert not np.allclose(auc[-1], per_class_auc(y, scores)[-1])


def test_masked_bootstrap_equals_a_brute_force_resample():
    y, scores, known, pid = masked_labels(n=300)
    names = ["Lung Opacity", "Pleural Effusion", "Fracture", "Edema", "Support Devices"]
    ci = bootstrap_auc(y, scores, pid, known=known, n_resamples=40, seed=5, names=names)
    np.testing.assert_allclose(ci.auc, per_class_auc(y, scores, known=known), atol=1e-12)
    assert ci.names == tuple(names)
    # brute force: draw the same patients, repeat their rows, sklearn on the known ones
    _, index = np.unique(pid, return_inverse=True)
    weights = resample_patients(index.max() + 1, 40, 5)
    point, reps = replicate_aucs(y, scores, index, weights, known=known)
    for b in (0, 17, 39):
        rows = np.repeat(np.arange(len(y)), weights[index, b].astype(int))
        for c in range(y.shape[1]):
            keep = rows[known[rows, c]]
            np.testing.assert_allclose(reps[b, c], roc_auc_score(y[keep, c], scores[keep, c]),
                                       atol=1e-9)


def test_masked_class_with_no_known_negative_is_undefined():
    y = np.array([[1, 1], [0, 0], [1, 1], [0, 0]])
    known = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    with pytest.warns(UndefinedAUCWarning, match=r"class 1 \(2 positives, 0 negatives\)"):
        auc = per_class_auc(y, [[0.1, 0.1], [0.2, 0.2], [0.9, 0.9], [0.3, 0.3]], known=known)
    assert auc[0] == 0.5 and np.isnan(auc[1])
    with pytest.raises(DataError, match="mask of shape"):
        per_class_auc(y, y.astype(float), known=known[:, :1].T)


# ---------------------------------------------------------------------------------------
# The kernel (cxrembed.mannwhitney) against the definition, on many small problems


def pairwise_auc(positive: np.ndarray, scores: np.ndarray, weight: np.ndarray) -> float:
    """The weighted Mann-Whitney definition, every (positive, negative) pair spelled out:
    sum of w_i w_j ([s_i > s_j] + [s_i == s_j] / 2) over positives i and negatives j,
    over (positive weight x negative weight); NaN when either weight is zero."""
    pos, neg = positive & (weight > 0), ~positive & (weight > 0)
    diff = scores[pos][:, None] - scores[neg][None, :]
    pair = np.outer(weight[pos], weight[neg])
    denom = pair.sum()
    return float(((diff > 0) * pair + 0.5 * (diff == 0) * pair).sum() / denom) if denom else np.nan


def random_problem(rng: np.random.Generator):
    """Few rows, ties of every kind (rounded, two values, +0.0 and -0.0), rare classes,
    unknown labels (a class with none known), patients with several rows."""
    n, classes = int(rng.integers(1, 40)), int(rng.integers(1, 6))
    y = rng.random((n, classes)) < rng.uniform(0.02, 0.6, classes)
    scores = rng.normal(size=(n, classes)) * rng.choice([0.3, 1, 50], classes)
    rounded = rng.random(classes) < 0.5
    scores[:, rounded] = np.round(scores[:, rounded])
    if classes > 1:
        scores[:, 1] = np.where(rng.random(n) < 0.5, 0.0, -0.0)  # a tie, whatever the sign
    known = rng.random((n, classes)) > rng.choice([0, 0.3])
    known[:, -1] &= rng.random() > 0.2  # sometimes: no known label at all
    patients = int(rng.integers(1, n + 1))
    pid = rng.integers(0, patients, n)
    weights = rng.multinomial(patients, np.ones(patients) / patients,
                              size=int(rng.integers(1, 60))).T.astype(np.float64)
    return y, scores, known, pid, weights


KERNEL_PATHS = ["default", "float64 sums", "many blocks", "many classes"]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_equals_the_pairwise_definition(path, monkeypatch):
    from cxrembed import mannwhitney

    if path == "float64 sums":  # the running sums past float32's exact range
        monkeypatch.setattr(mannwhitney, "_FLOAT32_EXACT", 0)
    if path == "many blocks":  # weightings taken 16 at a time
        monkeypatch.setattr(mannwhitney, "_BLOCK_ELEMENTS", 1)
    if path == "many classes":  # class sums as one sparse product (val selection's case)
        monkeypatch.setattr(mannwhitney, "_LOOP_CLASSES", 0)
    rng = np.random.default_rng(KERNEL_PATHS.index(path))
    checked = undefined = 0
    for _ in range(60):
        y, scores, known, pid, weights = random_problem(rng)
        auc = mannwhitney.weighted_aucs(y, scores, pid, weights, known)
        assert auc.shape == (weights.shape[1], y.shape[1])
        for b in range(weights.shape[1]):
            for c in range(y.shape[1]):
                rows = known[:, c]
                expected = pairwise_auc(y[rows, c], scores[rows, c], weights[pid[rows], b])
                if np.isnan(expected):
                    assert np.isnan(auc[b, c])
                    undefined += 1
                else:
                    assert auc[b, c] == pytest.approx(expected, abs=1e-12)
                    checked += 1
    assert checked > 1000 and undefined > 50  # both kinds were met


@pytest.mark.parametrize("rows", [0, 1, 63, 64, 65, 130, 1000])
def test_running_sums_down_the_rows_equal_numpy_cumsum(rows):
    from cxrembed.mannwhitney import _cumsum_rows

    x = np.random.default_rng(rows).integers(0, 5, (rows, 7)).astype(np.float32)
    expected = np.cumsum(x, axis=0)
    _cumsum_rows(x)
    np.testing.assert_array_equal(x, expected)
