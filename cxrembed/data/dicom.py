"""DICOM radiographs to the same H×W uint8 grey image a PNG decodes to.

The display pipeline of DICOM PS3.3 C.11, through pydicom's public API:

1. pixel data (compressed transfer syntaxes through pydicom's installed decoders);
2. modality LUT or rescale slope/intercept (:func:`pydicom.pixels.apply_modality_lut`);
3. VOI LUT or window centre/width (:func:`pydicom.pixels.apply_voi_lut`); without either,
   the whole range the stored bits can hold (``BitsStored``, not the container's 16 bits:
   a 12-bit image in 16-bit storage uses 0..4095, so it does not decode dark);
4. the output range of that step mapped linearly onto 0..255, MONOCHROME1 inverted
   (there, low values are white).

The output range of steps 2-3 is the one DICOM defines (and pydicom's windowing uses):
``0 .. 2**n - 1`` for a VOI LUT of ``n``-bit entries, else the stored range through the
rescale. Multi-frame images are refused; colour (RGB, YBR) is converted to grey with a
warning. Only :mod:`cxrembed.data.images` calls this; a DICOM file is decoded by
:func:`cxrembed.data.images.decode` like any image.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import DataError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Transfer syntax (by name fragment) -> the packages whose pydicom plugins decode it.
_DECODER_HINTS = (
    ("JPEG-LS", "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)"),
    ("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    ("High-Throughput JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"),
    ("JPEG", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    ("RLE", "pylibjpeg pylibjpeg-rle (pydicom's own RLE decoder should already work)"),
)


class ColourDicomWarning(UserWarning):
    """A colour DICOM was converted to grey (radiographs are monochrome)."""


@dataclass
class DicomImage:
    """A decoded radiograph and the header facts later checks use."""

    gray: np.ndarray  # H×W uint8, white = dense (MONOCHROME2 convention)
    view_position: str  # (0018,5101) ViewPosition: "PA", "AP", "LL", "LATERAL", ... or ""
    photometric: str
    bits_stored: int


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """True for a DICOM file: the ``DICM`` magic at byte 128, or a DICOM suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if head is None and suffix in (".png", ".jpg", ".jpeg"):
        return False  # the common case costs no extra read
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return False
    return head[128:132] == b"DICM"


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise DataError("reading DICOM needs pydicom: pip install 'pydicom>=3.0'") from None
    return pydicom


def read_header(path: str | Path) -> Any:
    """The dataset without its pixel data (fast: for the view position and checks)."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise DataError(f"cannot read DICOM {path}: {exc}") from None


def _pixel_array(ds: Any, path: str | Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise DataError(f"DICOM {path} holds no pixel data (a report or a structured "
                        "document?); give the image series")
    try:
        return ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = next((pkgs for key, pkgs in _DECODER_HINTS if key in name),
                        "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)")
            raise DataError(f"DICOM {path} is compressed as {name} ({syntax}) and no "
                            f"installed decoder reads it ({str(exc).splitlines()[0]}); "
                            f"pip install {hint}") from None
        raise DataError(f"cannot decode the pixels of DICOM {path}: {exc}") from None


def modality_range(ds: Any) -> tuple[float, float]:
    """The values the modality LUT / rescale step can output (DICOM PS3.3 C.11.1)."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _display_range(ds: Any) -> tuple[float, float]:
    """Output range of the VOI step that :func:`apply_voi_lut` applies (LUT preferred)."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    return modality_range(ds)


def read_dicom(path: str | Path) -> DicomImage:
    """Decode one single-frame DICOM radiograph to H×W uint8 grey (see module doc)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from cxrembed.data.image_checks import check_size
    from cxrembed.data.images import scale_to_uint8

    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as exc:
        raise DataError(f"cannot read DICOM {path}: {exc}") from None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise DataError(f"DICOM {path} has an unreadable Rows, Columns or NumberOfFrames "
                        f"({exc})") from None
    check_size(*size, path)  # before decoding: a compressed frame can be a bomb
    if frames > 1:
        raise DataError(f"DICOM {path} holds {frames} frames; cxrembed reads single-frame "
                        "radiographs: export the frame you want as its own file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    arr = _pixel_array(ds, path)
    if int(ds.get("SamplesPerPixel", 1)) > 1 or arr.ndim == 3:
        import cv2

        warnings.warn(f"{path}: colour DICOM ({photometric}) converted to grey; "
                      "radiographs are normally MONOCHROME1/2", ColourDicomWarning,
                      stacklevel=2)
        rgb = scale_to_uint8(arr.astype(np.float64), 0.0, float(2 ** bits - 1))
        gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds)
        lo, hi = _display_range(ds)
        gray = scale_to_uint8(np.asarray(values, dtype=np.float64), lo, hi)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
    else:
        raise DataError(f"DICOM {path} has photometric interpretation {photometric!r}; "
                        "expected MONOCHROME1, MONOCHROME2 or a colour one")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return DicomImage(np.ascontiguousarray(gray), view, photometric, bits)
