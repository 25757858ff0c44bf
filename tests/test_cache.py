"""The pixel cache: same pixels as decoding, resumable after any interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cxrembed.data import load_nih
from cxrembed.data import cache as cache_mod
from cxrembed.data.cache import ImageSource, PixelCache, build_pixel_cache
from cxrembed.data.images import decode
from cxrembed.errors import DataError


def _pixels(path):
    with h5py.File(path, "r") as f:
        return f["pixels"][:], f["done"][:], bool(f.attrs["complete"])


def test_cache_equals_decoding(twin, tmp_path):
    ds = load_nih(twin)
    path = build_pixel_cache(ds, tmp_path / "px.h5", workers=2, progress=False)
    pixels, done, complete = _pixels(path)
    assert complete and done.all() and pixels.shape == (240, 224, 224)
    rows = np.array([0, 17, 239, 17])
    expected = np.stack([decode(ds.path[r]) for r in rows])
    assert np.array_equal(ImageSource(ds, path).read(rows), expected)
    assert np.array_equal(ImageSource(ds).read(rows), expected)


def test_interrupted_build_resumes_to_the_same_bytes(twin, tmp_path, monkeypatch):
    ds = load_nih(twin)
    reference = build_pixel_cache(ds, tmp_path / "ref.h5", workers=0, progress=False)
    monkeypatch.setattr(cache_mod, "BLOCK", 50)
    calls = {"n": 0}
    real = cache_mod._decode_block

    def dying(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(cache_mod, "_decode_block", dying)
    with pytest.raises(KeyboardInterrupt):
        build_pixel_cache(ds, tmp_path / "px.h5", workers=0, progress=False)
    _, done, complete = _pixels(tmp_path / "px.h5")
    assert not complete and done.sum() == 100
    with pytest.raises(DataError, match="incomplete"):
        PixelCache(tmp_path / "px.h5")

    decoded = []
    monkeypatch.setattr(cache_mod, "_decode_block",
                        lambda job: decoded.append(job[0]) or real(job))
    build_pixel_cache(ds, tmp_path / "px.h5", workers=0, progress=False)
    assert decoded == [100, 150, 200]  # finished rows are not decoded again
    a, b = _pixels(tmp_path / "px.h5"), _pixels(reference)
    assert np.array_equal(a[0], b[0]) and a[1].all() and a[2]


@pytest.mark.slow
def test_kill_9_mid_build_resumes_to_the_same_bytes(tmp_path):
    from cxrembed.data.synth import make_twin

    twin = make_twin(tmp_path / "nih", images=1200, size=256, seed=1, workers=1)
    ds = load_nih(twin)
    reference = build_pixel_cache(ds, tmp_path / "ref.h5", workers=1, progress=False)
    script = (
        "import cxrembed.data.cache as c; from cxrembed.data import load_nih; c.BLOCK = 16\n"
        f"c.build_pixel_cache(load_nih({str(twin)!r}), {str(tmp_path / 'px.h5')!r}, workers=1,"
        " progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.05)
        try:
            with h5py.File(tmp_path / "px.h5", "r", locking=False) as f:
                if 100 < f["done"][:].sum():
                    break
        except (OSError, KeyError):
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    # Its decoding worker died with it (no orphan holding the file).
    import subprocess as sp

    orphans = sp.run(["pgrep", "-f", "c.BLOCK = 16"], capture_output=True, text=True).stdout
    assert not orphans.strip(), orphans
    _, done, complete = _pixels(tmp_path / "px.h5")
    assert not complete and 0 < done.sum() < len(ds)
    build_pixel_cache(ds, tmp_path / "px.h5", workers=1, progress=False)
    assert np.array_equal(_pixels(tmp_path / "px.h5")[0], _pixels(reference)[0])


def test_refuses_a_cache_of_other_images(twin, tmp_path):
    ds = load_nih(twin)
    build_pixel_cache(ds.subset(np.arange(20)), tmp_path / "px.h5", workers=0, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        build_pixel_cache(ds, tmp_path / "px.h5", workers=0, progress=False)
    build_pixel_cache(ds, tmp_path / "px.h5", workers=0, overwrite=True, progress=False)
    assert len(PixelCache(tmp_path / "px.h5")) == 240


def test_image_source_names_an_image_not_in_the_cache(twin, tmp_path):
    ds = load_nih(twin)
    build_pixel_cache(ds.subset(np.arange(20)), tmp_path / "px.h5", workers=0, progress=False)
    with pytest.raises(DataError, match=ds.image_id[20]):
        ImageSource(ds, tmp_path / "px.h5")


def test_unreadable_image_stops_with_its_name_and_keeps_what_was_written(twin, tmp_path,
                                                                         monkeypatch):
    import shutil

    root = tmp_path / "nih"
    shutil.copytree(twin, root)
    ds = load_nih(root)
    monkeypatch.setattr(cache_mod, "BLOCK", 40)
    bad = ds.path[100]
    open(bad, "wb").write(b"garbage")
    with pytest.raises(DataError, match=os.path.basename(bad)):
        build_pixel_cache(ds, tmp_path / "px.h5", workers=0, progress=False)
    assert _pixels(tmp_path / "px.h5")[1].sum() == 80


def test_cache_of_other_preprocessing_is_refused(twin, tmp_path):
    ds = load_nih(twin)
    path = build_pixel_cache(ds.subset(np.arange(10)), tmp_path / "px.h5", workers=0,
                             progress=False)
    with h5py.File(path, "a") as f:
        f.attrs["preprocessing"] = '{"decode": "something else"}'
    with pytest.raises(DataError, match="other preprocessing"):
        PixelCache(path)
    with pytest.raises(DataError, match=r"px\.h5 holds pixels decoded with other "
                                        r"preprocessing .*pass --overwrite"):  # nor resumed
        build_pixel_cache(ds.subset(np.arange(10)), path, workers=0, progress=False)


def test_cache_command_prints_the_pixels_the_cache_holds(twin, tmp_path):
    """A cache reused for a smaller dataset (one view of it) holds every image it was
    built with: the size printed counts those pixels (240 x 224 x 224 bytes = 11.5 MiB)."""
    from typer.testing import CliRunner

    from cxrembed.cli.common import app

    out = build_pixel_cache(load_nih(twin), tmp_path / "px.h5", workers=0, progress=False)
    pa = len(load_nih(twin, view="PA"))
    assert 0 < pa < 240
    result = CliRunner().invoke(app, ["cache", str(twin), "--out", str(out), "--view",
                                      "PA", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"cached {pa} images in" in result.output
    assert "(11.5 MiB of pixels)" in " ".join(result.output.split())
