"""Checks on an image file's bytes before any decoder sees them (hostile or damaged files).

A decoder given a damaged or hostile file either prints on stderr at C level (libpng's
``libpng error: IDAT: CRC error``, which no Python code can silence or catch) or
allocates what the header claims (a "decompression bomb": a few kilobytes that inflate
to gigabytes). So, reading only the headers:

- a PNG's chunks are walked and each chunk's CRC is checked (about 1 ms per MB, ~1.5% of
  decoding an NIH PNG): a file cut short or damaged is a DataError, and libpng never sees it;
- a PNG's (IHDR) or JPEG's (SOF) width and height must be non-zero and their product at
  most :func:`max_image_pixels`; any other format is sized by Pillow's header reader.

The pixel limit is the smaller of Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 by
default; None switches Pillow's own check off) and OpenCV's ``CV_IO_MAX_IMAGE_PIXELS``
environment variable (2**30 by default in OpenCV): whichever decoder runs, both apply.
The largest radiographs of the public collections are about 4,300 x 3,500 (15 M pixels).
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np

from cxrembed.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
#: OpenCV's own default for ``CV_IO_MAX_IMAGE_PIXELS``.
OPENCV_DEFAULT_PIXELS = 1 << 30
#: SOF markers that carry the frame size (not DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def max_image_pixels() -> int:
    """Largest width x height decoded: Pillow's and OpenCV's limits, the smaller."""
    from PIL import Image

    limits = [OPENCV_DEFAULT_PIXELS]
    if Image.MAX_IMAGE_PIXELS is not None:
        limits.append(int(Image.MAX_IMAGE_PIXELS))
    env = os.environ.get("CV_IO_MAX_IMAGE_PIXELS", "").strip()
    if env.isdigit():
        limits.append(int(env))
    return min(limits)


def check_size(width: int, height: int, path: str) -> None:
    """Refuse an empty image or one past :func:`max_image_pixels` (before decoding)."""
    if width <= 0 or height <= 0:
        raise DataError(f"cannot decode image {path}: its header says {width}x{height} pixels")
    limit = max_image_pixels()
    if width * height > limit:
        raise DataError(
            f"refusing to decode image {path}: its header says {width:,}x{height:,} pixels "
            f"({width * height:,}), past the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS "
            "and CV_IO_MAX_IMAGE_PIXELS, the smaller): a decompression bomb or not a "
            "radiograph; raise the limit only for a file you trust")


def check_png(data: memoryview | bytes, path: str) -> None:
    """Walk a PNG's chunks: IHDR's size within the limit, every CRC right, IEND reached."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        if pos + 12 + length > end:
            break
        crc = int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != crc:
            raise DataError(f"cannot decode image {path}: its PNG chunk {kind!r} at byte "
                            f"{pos:,} fails its CRC check (the file is damaged); "
                            "re-download it or drop it from the lists")
        if kind == b"IHDR" and length >= 8:
            check_size(int.from_bytes(data[pos + 8:pos + 12], "big"),
                       int.from_bytes(data[pos + 12:pos + 16], "big"), path)
        if kind == b"IEND":
            return
        pos += 12 + length
    raise DataError(f"cannot decode image {path}: the PNG is truncated ({end:,} bytes, its "
                    "last chunk cut short); re-download it or drop it from the lists")


def jpeg_size(data: memoryview | bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, or None when there is none before SOS."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and pos + 9 <= end:
            return (int.from_bytes(data[pos + 7:pos + 9], "big"),
                    int.from_bytes(data[pos + 5:pos + 7], "big"))
        if marker == 0xDA or length < 2:
            return None
        pos += 2 + length
    return None


def check_image_bytes(buf: np.ndarray, path: str) -> None:
    """Every pre-decode check of one image file's bytes (see the module docstring)."""
    data = buf.data.cast("B") if buf.flags.c_contiguous else memoryview(bytes(buf))
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        check_png(data, path)
        return
    if head.startswith(JPEG_SIGNATURE):
        size = jpeg_size(data)
        if size is not None:
            check_size(*size, path)
        return
    if not len(data):
        return
    from PIL import Image, UnidentifiedImageError

    try:  # another format (BMP, TIFF, WebP...): Pillow reads its size from the header only
        with Image.open(io.BytesIO(bytes(data))) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:
        raise DataError(f"refusing to decode image {path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # not an image Pillow knows: OpenCV says so (with its own pixel limit)
    check_size(width, height, path)
