"""Hostile and damaged image files: a clean DataError naming the file, nothing on stderr
from the C decoders, no decompression bomb inflated, whichever decoder runs."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from cxrembed.data.images import decode
from cxrembed.errors import DataError

DECODERS = ("opencv", "pil")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_of_zeros(width: int, height: int) -> bytes:
    """A real 8-bit grey PNG of ``width`` x ``height`` black pixels, built row by row (a
    decompression bomb when large: kilobytes on disk)."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + _ihdr(width, height) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _ihdr(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _png_claiming(width: int, height: int, real: int) -> bytes:
    """A ``real`` x ``real`` black PNG whose header (valid CRC) claims ``width`` x ``height``."""
    return _png_of_zeros(real, real).replace(_ihdr(real, real), _ihdr(width, height))


@pytest.fixture
def radiograph(tmp_path):
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((300, 260)) * 255).astype(np.uint8), (9, 9), 3)
    path = tmp_path / "ok.png"
    cv2.imwrite(str(path), img)
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_zero_byte_and_truncated_pngs_are_data_errors(tmp_path, radiograph, decoder, capfd):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.png"
    cut.write_bytes(radiograph.read_bytes()[:700])
    for path in (empty, cut):
        with pytest.raises(DataError, match=str(path.name)):
            decode(path, decoder=decoder)
    assert "libpng" not in capfd.readouterr().err


@pytest.mark.parametrize("decoder", DECODERS)
def test_png_with_a_bad_crc_is_refused_without_libpng_on_stderr(tmp_path, radiograph, decoder,
                                                                 capfd):
    data = bytearray(radiograph.read_bytes())
    data[data.find(b"IDAT") + 40] ^= 0xFF  # one byte of the pixel data flipped
    bad = tmp_path / "bad_crc.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad_crc\.png.*CRC"):
        decode(bad, decoder=decoder)
    assert capfd.readouterr().err == ""  # libpng printed "libpng error: IDAT: CRC error"


@pytest.mark.parametrize("decoder", DECODERS)
def test_jpeg_named_png_decodes_as_the_jpeg_it_is(tmp_path, radiograph, decoder):
    img = cv2.imread(str(radiograph), cv2.IMREAD_GRAYSCALE)
    ok, jpeg = cv2.imencode(".jpg", img)
    assert ok
    (tmp_path / "real.jpg").write_bytes(jpeg.tobytes())
    (tmp_path / "lying.png").write_bytes(jpeg.tobytes())
    np.testing.assert_array_equal(decode(tmp_path / "lying.png", decoder=decoder),
                                  decode(tmp_path / "real.jpg", decoder=decoder))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    # 12,000 x 8,000 = 96 M pixels: past Pillow's default 89,478,485, ~100 KB on disk
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png_of_zeros(12_000, 8_000))
    assert path.stat().st_size < 300_000
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_png_decompression_bomb_is_refused_before_decoding(tmp_path, bomb, decoder, capfd):
    with pytest.raises(DataError, match=r"bomb\.png.*12,000x8,000.*decompression bomb"):
        decode(bomb, decoder=decoder)
    # a header claiming 100,000 x 100,000 behind a tiny body: refused on the header alone
    liar = tmp_path / "liar.png"
    liar.write_bytes(_png_claiming(100_000, 100_000, real=64))
    with pytest.raises(DataError, match="decompression bomb"):
        decode(liar, decoder=decoder)
    assert "libpng" not in capfd.readouterr().err


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("limit", ("pillow", "opencv"))
@pytest.mark.parametrize("suffix", (".png", ".jpg"))
def test_pillow_and_opencv_pixel_limits_both_apply(tmp_path, radiograph, monkeypatch,
                                                   decoder, limit, suffix):
    path = tmp_path / f"img{suffix}"
    cv2.imwrite(str(path), cv2.imread(str(radiograph), cv2.IMREAD_GRAYSCALE))
    assert decode(path, decoder=decoder).shape == (224, 224)  # 78,000 pixels: fine
    if limit == "pillow":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    else:
        monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(DataError, match=r"260x300 pixels .*limit of 50,000"):
        decode(path, decoder=decoder)


@pytest.mark.parametrize("decoder", DECODERS)
def test_absurd_dimensions_are_refused(tmp_path, decoder):
    thin = tmp_path / "thin.png"  # 1 x 5,000: resizing its short side to 224 would need
    thin.write_bytes(_png_of_zeros(1, 5_000))  # a 224 x 1,120,000 intermediate
    with pytest.raises(DataError, match=r"thin\.png.*aspect ratio"):
        decode(thin, decoder=decoder)
    empty = tmp_path / "zero_wide.png"
    empty.write_bytes(_png_claiming(0, 1, real=1))
    with pytest.raises(DataError, match="zero_wide.png"):
        decode(empty, decoder=decoder)


def test_dicom_claiming_absurd_size_is_refused_before_decoding(tmp_path):
    from dicom_files import write_dicom

    path = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint8))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60_000, 60_000  # 3.6 G pixels behind 64 bytes of pixel data
    ds.save_as(path)
    with pytest.raises(DataError, match=r"big\.dcm.*60,000x60,000.*decompression bomb"):
        decode(path)
