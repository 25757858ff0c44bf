"""DICOM decoding against hand computations, and the same picture as PNG and DICOM."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_files import write_dicom, write_png

from cxrembed.data.dicom import ColourDicomWarning, read_dicom
from cxrembed.data.images import decode
from cxrembed.errors import DataError

pytest.importorskip("pydicom")


def _twelve_bit(shape=(224, 224), seed=0) -> np.ndarray:
    """A smooth 12-bit picture (0..4095) in 16-bit storage, corners at both ends."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 4095, shape[1])[None, :] * np.ones(shape[0])[:, None]
    arr = np.clip(ramp + rng.normal(0, 40, shape), 0, 4095).astype(np.uint16)
    arr[0, 0], arr[-1, -1] = 0, 4095
    return arr


def _expect(fraction: np.ndarray) -> np.ndarray:
    """The hand computation: a 0..1 display value to 0..255, rounded half up."""
    return np.floor(np.clip(fraction, 0, 1) * 255 + 0.5).astype(np.uint8)


def test_12_bit_in_16_uses_bits_stored_not_the_container(tmp_path):
    arr = _twelve_bit()
    img = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=12))
    np.testing.assert_array_equal(img.gray, _expect(arr / 4095))
    assert img.gray.max() == 255 and img.gray.mean() > 100  # not dark (4095/65535 would be)


def test_monochrome1_is_inverted(tmp_path):
    arr = _twelve_bit()
    img = read_dicom(write_dicom(tmp_path / "m1.dcm", arr, bits_stored=12,
                                 photometric="MONOCHROME1"))
    np.testing.assert_array_equal(img.gray, 255 - _expect(arr / 4095))


def test_rescale_then_window_centre_and_width(tmp_path):
    arr = _twelve_bit()
    img = read_dicom(write_dicom(tmp_path / "w.dcm", arr, bits_stored=12, RescaleSlope=2,
                                 RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=2000))
    y = 2.0 * arr - 1024  # modality LUT
    fraction = (y - 999.5) / 1999 + 0.5  # DICOM PS3.3 C.11.2.1.2.1, LINEAR
    # pydicom maps the window onto the rescaled range [-1024, 7166] in float64; the last
    # rounding step may differ by one grey level from this direct computation.
    diff = img.gray.astype(int) - _expect(fraction).astype(int)
    assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.99
    assert img.gray[0, 0] == 0 and img.gray[-1, -1] == 255


def test_voi_lut_sequence_is_applied(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    arr = _twelve_bit()
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 1023).astype(np.uint16)  # 10-bit
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 10]
    item.add_new("LUTData", "US", lut.tolist())
    img = read_dicom(write_dicom(tmp_path / "lut.dcm", arr, bits_stored=12,
                                 VOILUTSequence=Sequence([item]),
                                 WindowCenter=100, WindowWidth=10))  # the LUT wins
    np.testing.assert_array_equal(img.gray, _expect(lut[arr] / 1023))


def test_multi_frame_is_refused_by_name(tmp_path):
    arr = np.stack([_twelve_bit((64, 64))] * 2)
    path = write_dicom(tmp_path / "multi.dcm", arr.reshape(128, 64), bits_stored=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.NumberOfFrames = 64, 2
    ds.save_as(path)
    with pytest.raises(DataError, match=r"multi.dcm holds 2 frames"):
        decode(path)


def test_rgb_is_converted_to_grey_with_a_warning(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    with pytest.warns(ColourDicomWarning, match="converted to grey"):
        img = read_dicom(path)
    np.testing.assert_array_equal(img.gray, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def test_rle_compressed_decodes_like_the_uncompressed(tmp_path):
    import pydicom
    from pydicom.uid import RLELossless

    arr = _twelve_bit()
    path = write_dicom(tmp_path / "rle.dcm", arr, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle2.dcm")
    np.testing.assert_array_equal(read_dicom(tmp_path / "rle2.dcm").gray,
                                  read_dicom(path).gray)


def test_compressed_without_a_decoder_names_the_package(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    for name in ("pylibjpeg", "jpeg_ls", "gdcm"):
        if __import__("importlib").util.find_spec(name) is not None:
            pytest.skip(f"{name} is installed: JPEG-LS can be decoded here")
    path = write_dicom(tmp_path / "ls.dcm", _twelve_bit((32, 32)), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(DataError, match=r"ls.dcm is compressed as JPEG-LS.*pip install pylibjpeg"):
        decode(path)


def test_not_a_dicom_and_missing_file_are_named(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"hello")
    with pytest.raises(DataError, match="broken.dcm"):
        decode(bad)
    with pytest.raises(DataError, match="nothere.dcm does not exist"):
        decode(tmp_path / "nothere.dcm")


def test_same_picture_as_png_and_dicom_decodes_to_the_same_pixels(tmp_path):
    rng = np.random.default_rng(2)
    eight = rng.integers(0, 256, (300, 260)).astype(np.uint8)
    np.testing.assert_array_equal(decode(write_png(tmp_path / "a.png", eight)),
                                  decode(write_dicom(tmp_path / "a.dcm", eight)))
    twelve = _twelve_bit((300, 260))
    from_dicom = decode(write_dicom(tmp_path / "b.dcm", twelve, bits_stored=12))
    for name, sbit in (("b.png", None), ("c.png", 12)):  # by max value, by sBIT
        for decoder in ("opencv", "pil"):
            got = decode(write_png(tmp_path / name, twelve, sbit), decoder=decoder)
            if decoder == "opencv":
                np.testing.assert_array_equal(got, from_dicom)
            else:  # PIL resizes with its own rounding
                assert np.abs(got.astype(int) - from_dicom).max() <= 2


def test_16_bit_png_with_12_bits_in_use_is_not_dark(tmp_path):
    twelve = _twelve_bit()
    for sbit in (None, 12):
        out = decode(write_png(tmp_path / f"p{sbit}.png", twelve, sbit), size=224)
        np.testing.assert_array_equal(out, _expect(twelve / 4095))
    # sBIT wins over the max value: a 16-bit image that happens to be dark stays dark
    dark16 = (twelve // 2).astype(np.uint16)
    out = decode(write_png(tmp_path / "dark.png", dark16, 16))
    np.testing.assert_array_equal(out, _expect(dark16 / 65535))


@pytest.mark.real_nih
def test_real_nih_pngs_and_their_dicom_conversions_decode_alike(shared_nih, tmp_path):
    """Each real NIH PNG converted to DICOM the way a converter would (the PNG's grey
    values as 8-bit MONOCHROME2 pixel data) decodes to the PNG's pixels."""
    from PIL import Image

    pngs = sorted((shared_nih / "sample").rglob("*.png"))
    assert len(pngs) >= 30
    for png in pngs:
        with Image.open(png) as im:
            mode, gray = im.mode, np.asarray(im.convert("L"))
        dcm = write_dicom(tmp_path / (png.stem + ".dcm"), gray)
        a, b = decode(png).astype(int), decode(dcm).astype(int)
        if mode == "L":
            np.testing.assert_array_equal(a, b)
        else:  # RGBA: OpenCV's and PIL's grey conversions round differently
            assert np.abs(a - b).max() <= 1, png.name
