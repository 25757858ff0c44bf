"""Decoding every PNG kind NIH ships, CLIP normalisation, and the training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrembed.data.images import CLIP_MEAN, CLIP_STD, decode
from cxrembed.data.transforms import TrainAugment, normalize, to_clip_tensor
from cxrembed.errors import DataError


def _gradient(size=300):
    return np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))


def _write(path, arr, mode):
    from PIL import Image

    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_modes_L_RGB_RGBA_decode_alike(tmp_path):
    gray = _gradient()
    rgb = np.dstack([gray] * 3)
    rgba = np.dstack([gray] * 3 + [np.full_like(gray, 255)])
    out = [decode(_write(tmp_path / f"{m}.png", a, m)) for m, a in
           (("L", gray), ("RGB", rgb), ("RGBA", rgba))]
    assert all(o.shape == (224, 224) and o.dtype == np.uint8 for o in out)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_16_bit_png_uses_the_full_range(tmp_path):
    import cv2

    arr = np.zeros((224, 224), np.uint16)
    arr[:, :112] = 65535
    arr[:, 112:] = 32896  # 128 * 257
    cv2.imwrite(str(tmp_path / "deep.png"), arr)
    for decoder in ("opencv", "pil"):
        out = decode(tmp_path / "deep.png", decoder=decoder)
        assert out[0, 0] == 255 and out[0, 200] == 128, decoder


def test_non_square_is_resized_on_the_short_side_and_centre_cropped(tmp_path):
    arr = np.zeros((400, 800), np.uint8)
    arr[:, 200:600] = 255  # the centre square is white, the sides black
    out = decode(_write(tmp_path / "wide.png", arr, "L"))
    assert out.shape == (224, 224) and out.min() == 255


def test_opencv_agrees_with_pil_reference(tmp_path):
    rng = np.random.default_rng(0)
    import cv2

    arr = cv2.GaussianBlur(rng.integers(0, 256, (1024, 1024)).astype(np.uint8), (0, 0), 6)
    path = _write(tmp_path / "x.png", arr, "L")
    a, b = decode(path, decoder="opencv").astype(int), decode(path, decoder="pil").astype(int)
    assert np.abs(a - b).max() <= 2


@pytest.mark.real_nih
def test_real_sample_images_decode(shared_nih):
    from PIL import Image

    paths = sorted((shared_nih / "sample" / "images").glob("*.png"))
    assert len(paths) == 33
    modes = {Image.open(p).mode for p in paths}
    assert modes == {"L", "RGBA"}
    for p in paths:
        a = decode(p)
        b = decode(p, decoder="pil")
        assert a.shape == (224, 224) and 20 < a.mean() < 235
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0, p.name


@pytest.mark.parametrize("content", [b"", b"not a png at all", None])
def test_broken_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is None:  # a truncated PNG
        _write(path, _gradient(), "L")
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    for decoder in ("opencv", "pil"):
        with pytest.raises(DataError, match="broken.png"):
            decode(path, decoder=decoder)


def test_truncated_png_gives_one_clean_error_and_nothing_on_stderr(tmp_path):
    """OpenCV's decoder printed "libpng error: ..." (and a WARN line) before the error."""
    import subprocess
    import sys

    path = _write(tmp_path / "cut.png", _gradient(), "L")
    blob = path.read_bytes()
    script = ("import sys\nfrom cxrembed.data.images import decode\n"
              "try:\n    decode(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    for cut in (200, len(blob) // 2, len(blob) - 12, len(blob) - 30):
        path.write_bytes(blob[:cut])
        proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                              text=True, timeout=60)
        assert "cut.png" in proc.stdout and "truncated" in proc.stdout, (cut, proc.stdout)
        assert proc.stderr == "", (cut, proc.stderr)


def test_absent_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        decode(tmp_path / "nope.png")


def test_clip_tensor_normalisation():
    gray = np.array([[0, 255]], dtype=np.uint8)
    x = to_clip_tensor(gray)
    assert x.shape == (3, 1, 2)
    for c in range(3):
        assert x[c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], rel=1e-5)
        assert x[c, 0, 1].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], rel=1e-5)
    assert to_clip_tensor(np.zeros((5, 8, 8), np.uint8)).shape == (5, 3, 8, 8)


def test_augment_with_no_jitter_is_identity_and_flip_flips():
    imgs = torch.from_numpy(np.stack([_gradient(32)] * 2))
    plain = to_clip_tensor(imgs)
    still = TrainAugment(hflip=0, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    assert torch.allclose(still(imgs), plain, atol=1e-5)
    flip = TrainAugment(hflip=1, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    assert torch.allclose(flip(imgs), plain.flip(-1), atol=1e-5)


def test_augment_is_seeded_and_varies_per_image():
    imgs = torch.from_numpy(np.stack([_gradient(64)] * 4))
    aug = TrainAugment()
    a = aug(imgs, generator=torch.Generator().manual_seed(1))
    b = aug(imgs, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 64, 64) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert torch.isfinite(a).all()


def test_normalize_matches_torchvision():
    from torchvision.transforms import Normalize

    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(normalize(x), Normalize(CLIP_MEAN, CLIP_STD)(x), atol=1e-6)
