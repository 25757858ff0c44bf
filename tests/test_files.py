"""Atomic writes: the old content or the new, never a part, and no temporary left."""

from __future__ import annotations

import pytest

from cxrembed.errors import DiskFullError
from cxrembed.files import atomic_write, atomic_write_text


def test_atomic_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old weights")

    def write_half(tmp):
        tmp.write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(DiskFullError, match=r"no space left to write .*model.safetensors "
                       r"\(No space left on device\).*free disk space"):
        atomic_write(path, write_half)
    assert path.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
