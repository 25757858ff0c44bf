"""Decoding NIH PNGs to what CLIP expects, and the paper's training augmentation.

Every image goes through two stages:

1. :func:`decode` reads a PNG (mode L, RGB, RGBA, 8 or 16 bit), a JPEG or a DICOM
   (:mod:`cxrembed.data.dicom`) into a ``size``×``size`` uint8 grayscale array: the shorter side resized to ``size`` with area averaging
   (no aliasing), then centre-cropped, as CLIP's own preprocessing does. This is what the
   pixel cache stores.
2. :mod:`cxrembed.data.transforms` turns a batch of such arrays into normalised float
   tensors; its :class:`~cxrembed.data.transforms.TrainAugment` runs the paper's
   augmentation batched on tensors, on the GPU when there is one.

This module needs numpy and OpenCV only, so decoding worker processes start fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrembed.data.image_checks import check_image_bytes, check_size
from cxrembed.errors import DataError

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODERS = ("opencv", "pil")
#: Recorded in stores and checkpoints so a mismatched use can be refused.
PREPROCESSING = {
    "decode": "grayscale, area resize of the shorter side, centre crop",
    "size": IMAGE_SIZE,
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "channels": "gray replicated to RGB",
}


def _resize_crop(gray: np.ndarray, size: int, where: str = "an image") -> np.ndarray:
    import cv2

    h, w = gray.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if nh * nw > 64 * size * size:  # an aspect past 64:1 would resize to a memory bomb
        raise DataError(f"cannot use {where}: it is {w}x{h} pixels, an aspect ratio past "
                        "64:1 (not a radiograph); drop it from the lists")
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        gray = cv2.resize(gray, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(gray[top:top + size, left:left + size])


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low .. high`` linearly onto 0..255 (rounded, clipped): the one rule PNG and
    DICOM decoding share, so the same picture decodes to the same pixels."""
    span = max(float(high) - float(low), 1e-12)
    out = (np.asarray(values, dtype=np.float64) - float(low)) * (255.0 / span) + 0.5
    return np.clip(out, 0, 255).astype(np.uint8)


def png_significant_bits(buf: bytes | np.ndarray) -> int | None:
    """The PNG's sBIT chunk (significant bits of its grey or colour samples), or None.

    A 12-bit radiograph saved in a 16-bit PNG says so here (sBIT = 12)."""
    data = bytes(buf[:1 << 16]) if isinstance(buf, np.ndarray) else bytes(buf[:1 << 16])
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"sBIT":
            bits = data[pos + 8:pos + 8 + length]
            return max(bits[:3]) if bits else None  # grey, or R/G/B (alpha left out)
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def bits_in_use(img: np.ndarray, significant: int | None) -> int:
    """Bits a 16-bit image really uses: the PNG's sBIT when it has one; otherwise the
    smallest common detector depth (10, 12, 14 or 16 bits) that holds its largest value.

    Without this, a 12-bit image stored in 16 bits (max 4095) decodes almost black."""
    if significant is not None and 1 <= significant <= 16:
        return int(significant)
    peak = int(img.max()) if img.size else 0
    return next(b for b in (10, 12, 14, 16) if peak < 2 ** b)


def _to_uint8_gray(img: np.ndarray, significant: int | None = None) -> np.ndarray:
    """Any decoded array (H×W, H×W×3, H×W×4; uint8 or uint16) to H×W uint8 gray.

    16-bit samples are scaled from the bits in use (:func:`bits_in_use`) to 0..255."""
    import cv2

    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[..., 0]
    if img.dtype == np.uint16:
        img = scale_to_uint8(img, 0.0, float(2 ** bits_in_use(img, significant) - 1))
    elif img.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {img.dtype}")
    return img


def decode(path: str | Path, size: int = IMAGE_SIZE, decoder: str = "opencv") -> np.ndarray:
    """Read one image file (PNG, JPEG, DICOM) into a ``size``×``size`` uint8 grey array.

    ``opencv`` is the fast default (measured in ``benchmarks/bench_decode.py``); ``pil``
    is the reference. Both give the same geometry; pixel values agree to within 1-2
    grey levels (different area-resize rounding).
    """
    return _resize_crop(read_image(path, decoder)[0], size, f"image {path}")


def read_image(path: str | Path, decoder: str = "opencv") -> tuple[np.ndarray, str]:
    """One image file at full size: H×W uint8 grey, and the DICOM ViewPosition ("" for
    other formats)."""
    path = str(path)
    if decoder not in DECODERS:
        raise DataError(f"unknown decoder {decoder!r}; expected one of {', '.join(DECODERS)}")
    from cxrembed.data.dicom import is_dicom, read_dicom

    if is_dicom(path):
        image = read_dicom(path)
        return image.gray, image.view_position
    buf = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    if buf is None:
        raise DataError(f"image {path} does not exist")
    check_image_bytes(buf, path)  # before any decoder: damaged files, bombs
    if decoder == "opencv":
        import cv2

        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
        if img is None:
            raise DataError(f"cannot decode image {path}: not an image, or truncated; "
                            "re-download it or drop it from the lists")
        gray = _to_uint8_gray(img, png_significant_bits(buf))
    else:
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(buf.tobytes())) as im:
                check_size(*im.size, path)  # Pillow checks its own limit only at 2x
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im).astype(np.uint16)
                    gray = _to_uint8_gray(arr, png_significant_bits(buf))
                else:
                    gray = np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}; re-download it or drop it "
                            "from the lists") from None
    return gray, ""
