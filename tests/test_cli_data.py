"""The data commands as a user runs them: exit codes, JSON, and one clear error line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cxrembed import __version__
from cxrembed.cli.common import app

runner = CliRunner()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cxrembed", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_version_and_help():
    result = _run("--version")
    assert result.returncode == 0 and __version__ in result.stdout + result.stderr
    for args in (["-h"], ["info", "-h"], ["cache", "-h"], ["synth", "-h"]):
        out = _run(*args)
        assert out.returncode == 0 and "Usage" in out.stdout, args


def test_synth_then_info_json(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "nih"), "--images", "60", "--size",
                                 "48", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 60 and summary["images_present"] == 60
    info = runner.invoke(app, ["info", str(tmp_path / "nih"), "--json"])
    again = json.loads(info.stdout)
    assert again["splits"] == summary["splits"]
    assert sum(s["images"] for s in again["splits"].values()) == 60


def test_bad_folder_is_one_red_line_not_a_traceback(tmp_path):
    result = _run("info", tmp_path / "nope")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, not wrapped, no traceback


def test_cache_command_writes_a_complete_cache(twin, tmp_path):
    import h5py

    result = _run("cache", twin, "--out", tmp_path / "px.h5", "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "px.h5") as f:
        assert f.attrs["complete"] and f["pixels"].shape == (240, 224, 224)
