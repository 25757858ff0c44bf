"""A few-shot sweep too large for the machine fails at once, from the store's shapes, with
the figures: a store of 10M rows (its datasets declared, only its split column written)
under an 8 GiB memory limit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cxrembed import memory
from cxrembed.errors import ConfigError
from cxrembed.fewshot import run_fewshot

ROWS = 10_000_000


@pytest.fixture
def huge_store(tmp_path):
    """10M rows by their shapes; no vector is written (HDF5 allocates them on first write),
    and the split column compresses to a few KiB. 2.5M rows are test."""
    path = tmp_path / "huge.h5"
    split = np.full(ROWS, b"train", dtype="S5")
    split[::4] = b"test"
    with h5py.File(path, "w") as f:
        f.create_dataset("embedding", shape=(ROWS, 512), dtype="f2")
        f.create_dataset("labels", shape=(ROWS, 14), dtype="u1")
        f.create_dataset("split", data=split, chunks=(1 << 20,), compression="gzip")
    return path


def test_fewshot_on_10m_rows_fails_before_loading_when_it_cannot_fit(huge_store,
                                                                      monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * memory.GIB)

    def no_loading(*args, **kwargs):
        raise AssertionError("the store was opened for loading")

    monkeypatch.setattr("cxrembed.fewshot.sweep.as_eval_data", no_loading)
    with pytest.raises(ConfigError) as caught:
        run_fewshot(huge_store, shots=[1], seeds=1, heads=["linear"])
    message = str(caught.value)
    # 2.5M test vectors x 512 x float32 x 3 = 14.3 GiB, 10M rows of metadata 2.0 GiB, scores 1.0
    assert f"store {huge_store} (10,000,000 rows, 2,500,000 test)" in message
    assert "needs about 17.4 GiB of memory, 8.0 GiB are available" in message
    assert "encode --split / --limit" in message


def test_a_sweep_that_fits_is_not_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: never refused
    memory.check_memory(10**15, "anything", "")
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 * memory.GIB)
    memory.check_memory(memory.GIB, "one GiB", "")
    with pytest.raises(ConfigError, match=r"one GiB needs about 1.0 GiB of memory, 0.5 GiB"):
        monkeypatch.setattr(memory, "available_bytes", lambda: memory.GIB // 2)
        memory.check_memory(memory.GIB, "one GiB", "free some")
