"""A full disk mid-write, through the installed `cxrembed` command: one clean error naming
the file and saying to free space (exit 1, no traceback), nothing written before damaged,
and the same command (its resume route) finishing once space is freed.

The full disk is the file size limit (``ulimit -f``) of the command's process, with
SIGXFSZ ignored so that a write past it fails with EFBIG as a full disk fails with ENOSPC.
benchmarks/faults.py runs the same on a real full tmpfs where one can be mounted.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cxrembed.data import load_nih
from cxrembed.data.cache import PixelCache, build_pixel_cache


def _command() -> str:
    script = Path(sys.executable).with_name("cxrembed")
    found = str(script) if script.is_file() else shutil.which("cxrembed")
    assert found, "the cxrembed console script is not installed (pip install -e .)"
    return found


def cxrembed(*args, limit: int | None = None) -> subprocess.CompletedProcess:
    """Run the command; with ``limit``, no file it writes may grow past ``limit`` bytes."""
    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "COLUMNS": "400"}  # the message on one line, as asserted
    return subprocess.run([_command(), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=full_disk if limit else None)


def assert_clean_disk_full(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    assert f"no space left to write {path}" in message, message
    assert "free disk space" in message, message


def test_cache_refused_on_a_full_disk_keeps_the_old_cache_and_resumes(twin, tmp_path):
    dataset = load_nih(twin)
    cache = build_pixel_cache(dataset, tmp_path / "pixels.h5", workers=0, progress=False)
    before = cache.read_bytes()
    # Rebuilding over it: refused before the old cache is touched.
    result = cxrembed("cache", twin, "--out", cache, "--overwrite", "--workers", "0",
                      "--no-progress", limit=2**20)
    assert_clean_disk_full(result, cache)
    assert cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixels.h5"]  # no stray temporary
    # A new cache on the full disk: no file under its name; once space is freed, the same
    # command builds the bytes an uninterrupted build writes.
    fresh = tmp_path / "fresh.h5"
    assert_clean_disk_full(cxrembed("cache", twin, "--out", fresh, "--workers", "0",
                                    "--no-progress", limit=2**20), fresh)
    assert not fresh.exists()
    done = cxrembed("cache", twin, "--out", fresh, "--workers", "0", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert fresh.read_bytes() == before
    assert len(PixelCache(fresh)) == len(dataset)


@pytest.fixture(scope="module")
def world(tiny_store, tmp_path_factory):
    """The session's tiny-CLIP store of the twin and a kNN head on it."""
    from cxrembed.fewshot.fit import fit_head

    root = tmp_path_factory.mktemp("disk-full")
    fit_head(tiny_store.store, "knn", all_rows=True, out=root / "head")
    return {"root": root, "store": tiny_store.store, "head": root / "head",
            "dataset": tiny_store.dataset, "encoder": tiny_store.encoder}


@pytest.mark.slow
def test_predict_csv_cut_by_a_full_disk_resumes_to_the_same_bytes(world, tmp_path):
    from cxrembed.predict import predict_images

    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in world["dataset"].path[:40]))
    reference = tmp_path / "reference.csv"
    predict_images([listing], world["head"], reference, batch_size=8, workers=1,
                   device="cpu", encoder=world["encoder"])
    assert reference.stat().st_size > 6000  # the limit below falls mid-file
    out = tmp_path / "preds.csv"
    args = ("predict", listing, "--head", world["head"], "--out", out, "--batch-size", "8",
            "--workers", "1", "--device", "cpu", "--no-progress")
    result = cxrembed(*args, limit=3000)
    assert_clean_disk_full(result, out)
    kept = out.read_bytes()
    assert 0 < len(kept) <= 3000 and reference.read_bytes().startswith(kept)
    again = cxrembed(*args)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_encode_on_a_full_disk_leaves_no_store_then_a_failed_index_is_rebuilt(twin,
                                                                             tmp_path):
    store = tmp_path / "store.h5"
    args = ("encode", twin, "--out", store, "--model", "cxr-tiny", "--pretrained", "none",
            "--batch-size", "32", "--workers", "0", "--device", "cpu", "--no-progress")
    assert_clean_disk_full(cxrembed(*args, limit=20_000), store)  # 240 x 512 x 2 B vectors
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # no store
    # Room for the store (354 KB) but not for its index (240 x 512 x 4 B = 492 KB): the
    # store is finished and kept, and `cxrembed index` builds the index once space is freed.
    result = cxrembed(*args, limit=420_000)
    index = store.with_suffix(".faiss")
    assert_clean_disk_full(result, index)
    assert "cxrembed index" in result.stderr and not index.exists()
    import faiss

    from cxrembed.store import EmbeddingStore

    built = cxrembed("index", store)
    assert built.returncode == 0, built.stderr
    with EmbeddingStore.open(store) as opened:
        assert opened.complete and len(opened) == 240
    assert faiss.read_index(str(index)).ntotal == 240


@pytest.mark.slow
def test_adapt_checkpoint_on_a_full_disk_then_resume(twin, tmp_path):
    run = tmp_path / "run"
    args = ("adapt", twin, "--out", run, "--model", "cxr-tiny", "--pretrained", "none",
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--workers", "0",
            "--no-progress")
    result = cxrembed(*args, limit=2**20)  # the epoch's weights file is 2.3 MB
    assert_clean_disk_full(result, run / "state" / "trainable-001.safetensors")
    assert "--resume" in result.stderr
    config = json.loads((run / "config.json").read_text())  # written before: intact
    assert config["config"]["epochs"] == 1
    assert not [p for p in run.rglob("*.tmp")]
    again = cxrembed(*args, "--resume")
    assert again.returncode == 0, again.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("epoch", "test") for x in lines] == [1, "test"]


def test_report_on_a_full_disk_keeps_the_previous_report(world, tmp_path):
    from cxrembed.report import write_report

    out = tmp_path / "report.html"
    write_report([world["store"]], out=out)
    before = out.read_bytes()
    result = cxrembed("report", world["store"], "--out", out, limit=len(before) // 2)
    assert_clean_disk_full(result, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
