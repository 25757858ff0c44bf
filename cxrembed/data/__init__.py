"""Readers (NIH, CheXpert, MIMIC-CXR-JPG, PadChest, any CSV, class folders), the one table
they all yield, patient splits, decoding, pixel cache and the synthetic twins."""

from cxrembed.data.nih import NIHDataset, load_nih
from cxrembed.data.readers import DATASETS, READERS, load_dataset
from cxrembed.data.splits import SPLITS, assert_patient_disjoint
from cxrembed.data.table import ImageTable

__all__ = ["DATASETS", "ImageTable", "NIHDataset", "READERS", "SPLITS",
           "assert_patient_disjoint", "load_dataset", "load_nih"]
