"""The installed `cxrembed` command as a shell or a script sees it: exit codes, usage errors,
Ctrl-C, and the messages printed. Each test runs the console script in a subprocess (the
entry point `main()`, not typer's CliRunner, which bypasses it).

The typer that runs here is whatever the subprocess imports: to check another typer
version, put it first on PYTHONPATH for the whole run, e.g.
``pip install --target /tmp/typer012 typer==0.12.5 click==8.1.8`` then
``PYTHONPATH=/tmp/typer012:. python -m pytest tests/test_cli_entry.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cxrembed.errors import ConfigError


def _command() -> str:
    script = Path(sys.executable).with_name("cxrembed")
    found = str(script) if script.is_file() else shutil.which("cxrembed")
    assert found, "the cxrembed console script is not installed (pip install -e .)"
    return found


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # no wrapping of the lines asserted on
    return subprocess.run([_command(), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=kwargs.pop("timeout", 120), **kwargs)


# ---------------------------------------------------------------------------------------
# Usage errors: click's usage line and message, exit 2, no traceback.


@pytest.mark.parametrize("args,message", [
    (["search", "S", "--bogus"], "No such option: --bogus"),
    (["search", "S", "-k", "abc"], "Invalid value for '-k'"),
    (["encode"], "Missing argument"),
    (["encod"], "No such command 'encod'"),
    (["search", "S", "--id", "x", "--rerank", "-5"], "Invalid value for '--rerank'"),
])
def test_usage_error_prints_usage_and_exits_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Usage: cxrembed" in result.stderr and message in result.stderr
    assert "-h' for help" in result.stderr
    assert result.stdout == ""


def test_cxrembed_error_is_one_red_line_exit_1(tmp_path):
    result = run("search", tmp_path / "nope.h5", "--text", "edema")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------
# Ctrl-C: exit 130 and say how to continue; what was written is kept.


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert time.monotonic() < deadline, "the command never started its work"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)


@pytest.fixture(scope="module")
def big_twin(tmp_path_factory) -> Path:
    """A twin whose caching takes a few seconds in one process (time to interrupt it)."""
    from cxrembed.data.synth import make_twin

    return make_twin(tmp_path_factory.mktemp("big") / "nih", images=600, size=256, seed=1,
                     workers=1)


@pytest.mark.slow
def test_ctrl_c_during_cache_exits_130_and_the_rerun_finishes(big_twin, tmp_path):
    import h5py

    out = tmp_path / "px.h5"
    args = [_command(), "cache", str(big_twin), "--out", str(out), "--workers", "0",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    _interrupt_when(proc, out.exists)  # created before the first image is decoded
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun the same command to continue" in stderr
    assert "Traceback" not in stderr
    again = run("cache", big_twin, "--out", out, "--workers", "0", "--no-progress")
    assert again.returncode == 0, again.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f["done"][:].all()


@pytest.mark.slow
def test_ctrl_c_during_encode_exits_130_and_resume_finishes(big_twin, tmp_path):
    import h5py

    out = tmp_path / "store.h5"
    common = ["--out", str(out), "--model", "cxr-tiny", "--pretrained", "none", "--index",
              "none", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen([_command(), "encode", str(big_twin), *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    _interrupt_when(proc, lambda: out.exists(), timeout=90)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun with --resume to continue" in stderr
    assert "Traceback" not in stderr
    resumed = run("encode", big_twin, *common, "--resume", "--json", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["rows"] == 600 and result["encoded"] + (result["resumed_from"] or 0) == 600
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"]


# ---------------------------------------------------------------------------------------
# Data commands on a partial download.


@pytest.fixture()
def partial_twin(twin, tmp_path) -> Path:
    """The 240-image twin with the PNGs of 100 images removed."""
    folder = tmp_path / "nih"
    shutil.copytree(twin, folder)
    for png in sorted(folder.rglob("*.png"))[:100]:
        png.unlink()
    return folder


def test_info_on_a_partial_download_shows_metadata_and_disk_counts(partial_twin):
    result = run("info", partial_twin, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    splits = summary["splits"]
    assert sum(s["images"] for s in splits.values()) == 240
    assert sum(s["on_disk"]["images"] for s in splits.values()) == 140
    assert all(s["on_disk"]["images"] <= s["images"] for s in splits.values())
    # The on-disk counts are those a command run with --allow-missing gets.
    from cxrembed.data import load_nih

    kept = load_nih(partial_twin, missing="drop")
    for name, counts in splits.items():
        rows = kept.split == name
        assert counts["on_disk"]["images"] == rows.sum()
        assert counts["on_disk"]["positives"]["Effusion"] == kept.labels[rows, 7].sum()
    table = run("info", partial_twin)
    assert "on disk / in the metadata" in table.stderr
    train = splits["train"]
    assert f"{train['on_disk']['images']} / {train['images']} img" in table.stderr


def test_cache_with_no_image_on_disk_is_an_error(twin, tmp_path):
    folder = tmp_path / "nih"
    shutil.copytree(twin, folder)
    for png in folder.rglob("*.png"):
        png.unlink()
    result = run("cache", folder, "--out", tmp_path / "px.h5", "--allow-missing",
                 "--no-progress")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: no image to cache")
    assert "cached 0 images" not in result.stderr


def test_missing_images_message_names_the_flag(partial_twin, tmp_path):
    result = run("cache", partial_twin, "--out", tmp_path / "px.h5")
    assert result.returncode == 1
    assert "pass --allow-missing" in result.stderr and "Traceback" not in result.stderr


def test_demo_takes_the_data_options():
    result = run("demo", "-h")
    for flag in ("--allow-missing", "--csv", "--train-val-list", "--test-list", "--view",
                 "--val-fraction", "--split-seed"):
        assert flag in result.stdout, flag


def test_demo_data_options_without_data_are_refused(tmp_path):
    result = run("demo", "--out", tmp_path / "d", "--csv", tmp_path / "meta.csv")
    assert result.returncode == 1
    assert "--csv" in result.stderr and "--data" in result.stderr


@pytest.mark.slow
def test_demo_on_a_partial_download_with_allow_missing(partial_twin, tmp_path):
    out = tmp_path / "demo"
    base = ["demo", "--data", partial_twin, "--out", out, "--epochs", "1", "--seeds", "1",
            "--shots", "1", "--no-progress", "--device", "cpu"]  # the sweep is not asserted
    refused = run(*base)
    assert refused.returncode == 1 and "--allow-missing" in refused.stderr
    result = run(*base, "--allow-missing", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["images"] == 140
    assert (out / "report.html").is_file()
    adapt_config = json.loads((out / "adapt" / "config.json").read_text())
    assert adapt_config["config"]["allow_missing"] is True
    steps = {s["name"]: s["command"] for s in summary["steps"]}
    assert "--allow-missing" in steps["pixel cache"] and "--allow-missing" in steps[
        "encode (frozen CLIP)"]


# ---------------------------------------------------------------------------------------
# Devices and messages.


@pytest.mark.slow
def test_encode_on_cuda_without_cuda_is_a_clear_error(twin, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error cannot happen here")
    result = run("encode", twin, "--out", tmp_path / "s.h5", "--model", "cxr-tiny",
                 "--pretrained", "none", "--device", "cuda")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: --device cuda:") and "--device cpu" in result.stderr
    assert not (tmp_path / "s.h5").exists()


def test_resolve_device():
    import torch

    from cxrembed.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1", "CUDA"):
            with pytest.raises(ConfigError, match="use --device cpu"):
                resolve_device(name)
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_two_queries_are_named_by_their_flags(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_search import make_store

    store = make_store(tmp_path / "s.h5", n=50)
    result = run("search", store, "--id", "00000001_000.png", "--text", "edema")
    assert result.returncode == 1
    assert "got --id and --text" in result.stderr and "image_id" in result.stderr


@pytest.mark.slow
def test_montage_of_moved_images_warns_and_suggests_data(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from test_search import make_store

    store = make_store(tmp_path / "s.h5", n=60)
    moved = tmp_path / "moved"
    moved.mkdir()
    import h5py

    with h5py.File(store, "r") as f:
        ids = f["image_id"].asstr()[:]
    for name in ids:
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(moved / name)
    args = ["search", store, "--id", ids[0], "-k", "5"]
    lost = run(*args, "--montage", tmp_path / "a.png")
    assert lost.returncode == 0, lost.stderr
    assert "6 of 6 images not found" in lost.stderr and "--data" in lost.stderr
    found = run(*args, "--montage", tmp_path / "b.png", "--data", moved)
    assert found.returncode == 0 and "not found" not in found.stderr


# ---------------------------------------------------------------------------------------
# Import side effects.


def test_import_cxrembed_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, cxrembed; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
    # The command sets it, before torch is imported (it has no effect after).
    code = ("import os, sys, cxrembed.cli; print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "PASSIVE", out.stderr


@pytest.mark.slow
def test_montage_leaves_the_matplotlib_backend_alone(tmp_path):
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_search import make_store
from cxrembed.search import search
store = make_store({str(tmp_path / 's.h5')!r}, n=40)
search(store, image_id="00000001_000.png", k=3, montage={str(tmp_path / 'm.png')!r})
print(matplotlib.get_backend())
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().lower() == "svg"
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_weights_are_described_in_words():
    from cxrembed.model.loading import WeightsSource

    def source(kind, name):
        return WeightsSource(kind, name, None, False, "").describe()

    assert source("none", "none") == "random init (no pretrained weights)"
    assert source("tag", "openai") == "openai weights"
    assert source("file", "/w/ViT-B-32.pt") == "weights from /w/ViT-B-32.pt"
    assert source("run", "runs/vitb32") == "adapted run runs/vitb32"


def test_log_lines_and_progress_bars_share_one_console():
    """A log line printed while a bar runs goes above it only when both use one console."""
    import logging
    import warnings

    import cxrembed.progress
    from cxrembed.cli import _root

    root = logging.getLogger()
    before = root.handlers[:], root.level, warnings.showwarning
    try:
        _root(verbose=False, version=False)
        assert root.handlers[0].console is cxrembed.progress.console
    finally:
        root.handlers[:], root.level, warnings.showwarning = before
