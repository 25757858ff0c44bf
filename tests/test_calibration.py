"""Calibration and thresholds against sklearn and brute force; operating points and ECE
against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from cxrembed.calibration import (expected_calibration_error, fit_calibration, operating_point,
                                  parse_rule, pick_threshold)
from cxrembed.errors import ConfigError


@pytest.fixture()
def val():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(int)
    s = rng.normal(size=400) + 1.5 * y
    return s, y


def _rates(s, y, t):
    d = s >= t
    return (d & (y == 1)).sum() / (y == 1).sum(), (~d & (y == 0)).sum() / (y == 0).sum()


def test_threshold_rules_match_brute_force(val):
    s, y = val
    cands = np.unique(s)
    rates = np.array([_rates(s, y, t) for t in cands])
    youden = cands[np.argmax(rates[:, 0] + rates[:, 1] - 1)]
    assert pick_threshold(s, y, "youden") == youden
    ok = rates[:, 0] >= 0.9
    assert pick_threshold(s, y, "sensitivity=0.9") == cands[ok].max()  # most specific
    ok = rates[:, 1] >= 0.9
    assert pick_threshold(s, y, "specificity=0.9") == cands[ok].min()  # most sensitive
    f1 = []
    for t in cands:
        d = s >= t
        tp = (d & (y == 1)).sum()
        f1.append(2 * tp / (d.sum() + (y == 1).sum()))
    assert pick_threshold(s, y, "f1") == cands[int(np.argmax(f1))]


def test_platt_and_isotonic_equal_sklearn(val):
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    s, y = val
    cal = fit_calibration(s[:, None] * 40, y[:, None], ["A"], method="platt")["A"]
    ref = LogisticRegression(C=np.inf, max_iter=1000).fit(s[:, None] * 40, y)
    np.testing.assert_allclose(cal.probability(s * 40), ref.predict_proba(s[:, None] * 40)[:, 1],
                               atol=1e-4)
    cal = fit_calibration(s[:, None], y[:, None], ["A"], method="isotonic")["A"]
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(s, y)
    probe = np.linspace(-5, 5, 101)
    np.testing.assert_allclose(cal.probability(probe), iso.predict(probe), atol=1e-12)


def test_class_without_val_positives_is_listed_and_never_positive():
    s = np.random.default_rng(1).normal(size=(50, 2))
    y = np.zeros((50, 2), int)
    y[:10, 0] = 1
    cal = fit_calibration(s, y, ["A", "B"])
    assert cal["B"].note == "val has 0 positives of 50"
    assert np.isnan(cal["B"].probability(s[:, 1])).all() and not cal["B"].decide(s[:, 1]).any()


def test_bad_rule_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="youden, f1, sensitivity=X"):
        parse_rule("sensitivity=1.5")
    assert parse_rule("Specificity = 0.95") == ("specificity", 0.95)


def test_operating_point_counts_and_patient_bootstrap():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    d = np.array([1, 1, 0, 0, 0, 1, 0, 1], bool)
    patient = np.array([0, 0, 1, 2, 3, 3, 4, 5])
    out = operating_point(y, d, patient, bootstrap=200, seed=0)
    assert out["sensitivity"]["value"] == pytest.approx(3 / 4)
    assert out["specificity"]["value"] == pytest.approx(3 / 4)
    assert out["ppv"]["value"] == pytest.approx(3 / 4)
    assert out["npv"]["value"] == pytest.approx(3 / 4)
    for m in out.values():
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["ci_low"] < m["ci_high"]


def test_ece_equals_the_hand_computation():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5])
    y = np.array([0, 1, 1, 1, 0])
    ece, diagram = expected_calibration_error(p, y, bins=10)
    # bins: [0.0,0.1): conf .05 freq .5 (2 rows); [0.9,1]: .95 vs 1 (2); [0.5,0.6): .5 vs 0 (1)
    assert ece == pytest.approx((2 * 0.45 + 2 * 0.05 + 1 * 0.5) / 5)
    assert diagram["count"] == [2, 1, 2]
