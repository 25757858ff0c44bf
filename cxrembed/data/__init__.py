"""NIH reader, patient splits, decoding, pixel cache and the synthetic twin."""

from cxrembed.data.nih import NIHDataset, load_nih
from cxrembed.data.splits import SPLITS, assert_patient_disjoint

__all__ = ["NIHDataset", "SPLITS", "assert_patient_disjoint", "load_nih"]
