"""Patient-disjoint splits.

The paper's code split train_val by image, so one patient's follow-ups landed in both
train and val. Here val is a seeded random set of *patients*, and every split is
checked for shared patients.
"""

from __future__ import annotations

import numpy as np

from cxrembed.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def split_train_val_by_patient(patient_id: np.ndarray, in_train_val: np.ndarray, *,
                               val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of rows that go to val: all images of a seeded ``val_fraction`` of
    the train_val patients. Depends only on the set of patients and the seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val fraction {val_fraction} must be in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"split seed {seed!r} must be a whole number >= 0")
    patients = np.unique(patient_id[in_train_val])
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and n_val == 0 and len(patients) > 1:
        n_val = 1
    rng = np.random.default_rng(seed)
    val_patients = rng.permutation(patients)[:n_val]
    return in_train_val & np.isin(patient_id, val_patients)


def check_patient_disjoint(patient_id: np.ndarray, a: np.ndarray, b: np.ndarray,
                           image_id: np.ndarray, what: str) -> None:
    """Raise DataError when a patient has images in both row masks ``a`` and ``b``."""
    shared = np.intersect1d(patient_id[a], patient_id[b])
    if len(shared):
        example = image_id[b & (patient_id == shared[0])][0]
        raise DataError(
            f"{len(shared)} patient(s) have images in both {what} (first: patient "
            f"{shared[0]}, e.g. {example}); splits must be patient-disjoint, fix the lists"
        )


def assert_patient_disjoint(patient_id: np.ndarray, split: np.ndarray) -> None:
    """Check every pair of splits for shared patients (a DataError names the first)."""
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            check_patient_disjoint(patient_id, split == first, split == second,
                                   np.arange(len(split)).astype(str), f"{first} and {second}")
