"""What the kill -9 campaign (benchmarks/faults.py) found, kept as quick checks: a rerun of
a finished cache changes none of its bytes; metrics.jsonl is rebuilt from the committed
epochs whatever a kill left in it; --resume starts an adapt run that a kill left unstarted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrembed.data import load_nih
from cxrembed.data.cache import build_pixel_cache
from cxrembed.errors import ConfigError
from cxrembed.model.run_state import check_run_dir, rewrite_metrics


def test_rerunning_a_finished_cache_leaves_its_bytes(twin, tmp_path):
    dataset = load_nih(twin).subset(np.arange(40))
    out = build_pixel_cache(dataset, tmp_path / "pixels.h5", workers=0, progress=False)
    before = out.read_bytes()
    build_pixel_cache(dataset, out, workers=0, progress=False)  # the user's "resume" rerun
    assert out.read_bytes() == before


def test_metrics_rebuilt_from_the_committed_epochs(tmp_path):
    history = [{"epoch": 1, "val_mean_auc": 0.61, "lr": {"head": 1e-4}},
               {"epoch": 2, "val_mean_auc": float("nan"), "best_epoch": 1}]
    lines = [json.dumps(record) + "\n" for record in history]
    path = tmp_path / "metrics.jsonl"
    # A kill after epoch 2's commit but before its line: the line is written back.
    path.write_text(lines[0])
    rewrite_metrics(path, history)
    assert path.read_text() == "".join(lines)
    # A line cut off by a kill or a full disk, and a test line of an earlier finish: gone.
    path.write_text(lines[0] + lines[1] + '{"split": "test", "test_mean_auc": 0.5}\n{"epo')
    rewrite_metrics(path, history)
    assert path.read_text() == "".join(lines)


def test_resume_where_a_kill_left_no_run_starts_it(tmp_path):
    identity = {"config": {"epochs": 1}, "data": {"rows": 3}}
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)  # all that a kill before config.json leaves
    assert check_run_dir(out, identity, resume=True, overwrite=False) is None
    assert check_run_dir(tmp_path / "absent", identity, resume=True, overwrite=False) is None
    (out / "notes.txt").write_text("not a run")  # a folder with files of its own: refused
    with pytest.raises(ConfigError, match="not empty"):
        check_run_dir(out, identity, resume=True, overwrite=False)
