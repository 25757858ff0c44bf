"""Writing test DICOM and PNG files (pydicom, OpenCV): what a PACS export looks like."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, view: str | None = "PA", **elements) -> Path:
    """A single-frame Digital X-Ray DICOM of ``pixels`` (uint8 or uint16; H×W or H×W×3),
    explicit VR little endian; ``elements`` are extra header keywords (RescaleSlope=...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX image for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "TEST"
    if view is not None:
        ds.ViewPosition = view
    allocated = 8 * pixels.dtype.itemsize
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, pixels: np.ndarray, significant_bits: int | None = None) -> Path:
    """A grey PNG (8 or 16 bit), with an sBIT chunk when ``significant_bits`` is given."""
    import cv2

    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    data = buf.tobytes()
    if significant_bits is not None:
        body = b"sBIT" + bytes([significant_bits])
        chunk = (1).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        idat = data.index(b"IDAT") - 4  # sBIT goes before the first IDAT
        data = data[:idat] + chunk + data[idat:]
    Path(path).write_bytes(data)
    return Path(path)
