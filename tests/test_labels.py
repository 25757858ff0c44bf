import numpy as np
import pytest

from cxrembed.errors import DataError
from cxrembed.labels import (LABELS, NIH_PREVALENCE, canonical, default_prompts,
                             format_finding_labels, label_index, parse_finding_labels)


def test_paper_order_and_prevalence():
    assert LABELS[0] == "Atelectasis" and LABELS[9] == "Pleural Thickening"
    assert LABELS[-1] == "Hernia" and len(LABELS) == 14 == len(NIH_PREVALENCE)


def test_pleural_thickening_both_spellings():
    assert canonical("Pleural_Thickening") == canonical("pleural thickening") == "Pleural Thickening"
    assert label_index("Pleural_Thickening") == 9


def test_parse_and_format_round_trip():
    row = parse_finding_labels("Effusion|Pleural_Thickening|Cardiomegaly")
    assert np.flatnonzero(row).tolist() == [7, 9, 10]
    assert format_finding_labels(row) == "Effusion|Pleural_Thickening|Cardiomegaly"
    assert parse_finding_labels("No Finding").sum() == 0
    assert format_finding_labels(np.zeros(14)) == "No Finding"


def test_unknown_label_is_named():
    with pytest.raises(DataError, match="'Covid'"):
        parse_finding_labels("Effusion|Covid")


def test_default_prompts_pair_per_class():
    prompts = default_prompts()
    assert list(prompts) == list(LABELS)
    assert prompts["Edema"] == (["a chest x-ray showing edema"], ["no edema"])
