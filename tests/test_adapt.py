"""cxrembed.adapt and `cxrembed adapt`: learning, resume, selection on val, the run folder."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrembed.adapt import (AdaptConfig, TrainingInterrupted, adapt, auc_report,
                            evaluate_split)
from cxrembed.errors import ConfigError, DataError, ModelError
from cxrembed.labels import LABELS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 images, val 20% of train_val patients: every class but a few defined in val."""
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin

    root = make_twin(tmp_path_factory.mktemp("small") / "nih", images=300, size=64, seed=0,
                     workers=1)
    return load_nih(root, val_fraction=0.2)


def tiny(**values) -> AdaptConfig:
    base = dict(model="cxr-tiny", pretrained="none", workers=0, lr_encoder=1e-3, lr_head=1e-3,
                epochs=2, batch_size=16)
    base.update(values)
    return AdaptConfig.from_dict(base)


def count_test_evaluations(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = evaluate_split

    def counting(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs["split"])
        return real(*args, **kwargs)

    for module in ("cxrembed.adapt.loop", "cxrembed.adapt.run"):
        monkeypatch.setattr(f"{module}.evaluate_split", counting)
    return calls


def comparable(history: list[dict]) -> list[dict]:
    """An epoch record without its timings."""
    return [{k: v for k, v in h.items() if k not in ("images_per_s", "train_seconds")}
            for h in history]


@pytest.mark.slow
def test_val_auc_rises_well_above_chance(tmp_path):
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin
    from cxrembed.data.cache import ImageSource
    from cxrembed.model import AdaptedCLIP, DiagnosisHead, create_clip

    dataset = load_nih(make_twin(tmp_path / "nih", images=1000, size=64, seed=0, workers=1),
                       val_fraction=0.2)
    config = tiny(epochs=3, batch_size=32)
    # The untrained model (same seeded init) is the baseline the run must rise above.
    clip, _ = create_clip("cxr-tiny", "none")
    torch.manual_seed(config.seed)
    untrained = AdaptedCLIP(clip, DiagnosisHead(), config.unfreeze)
    val = dataset.split_rows("val")
    scores = evaluate_split(untrained, ImageSource(dataset), dataset.labels, val, "val", config,
                            torch.device("cpu"))
    _, baseline, _ = auc_report(dataset.labels[val], scores)

    result = adapt(dataset, tmp_path / "run", config, progress=False)
    assert result.val_mean_auc > 0.62 and result.val_mean_auc > baseline + 0.06, (
        baseline, [h["val_mean_auc"] for h in result.history])
    assert result.test_mean_auc > 0.65  # held-out patients, touched once
    assert result.trainable_params == 581_966  # cxr-tiny: 3 of 4 blocks + ln_post + proj + head


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(small, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    calls = count_test_evaluations(monkeypatch)
    config = tiny(epochs=3)
    whole = adapt(small, tmp_path / "whole", config, progress=False)
    assert calls.count("test") == 1

    def kill(epoch: int, step: int) -> None:
        if (epoch, step) == (2, 4):
            raise TrainingInterrupted

    calls.clear()
    with pytest.raises(TrainingInterrupted):
        adapt(small, tmp_path / "killed", config, progress=False, on_step=kill)
    progress = json.loads((tmp_path / "killed/state/progress.json").read_text())
    assert progress["epochs_done"] == 1 and not (tmp_path / "killed/model.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        adapt(small, tmp_path / "killed", config, progress=False)
    resumed = adapt(small, tmp_path / "killed", config, progress=False, resume=True)
    assert calls.count("test") == 1

    assert comparable(resumed.history) == comparable(whole.history)
    assert resumed.test_auc == whole.test_auc and resumed.best_epoch == whole.best_epoch
    a = load_file(str(tmp_path / "whole/model.safetensors"))
    b = load_file(str(tmp_path / "killed/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for run in ("whole", "killed"):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [x.get("epoch") for x in lines if "epoch" in x] == [1, 2, 3]
        assert sum(x.get("split") == "test" for x in lines) == 1

    # A finished run resumed again: its result, no training, no second look at test.
    calls.clear()
    again = adapt(small, tmp_path / "killed", config, progress=False, resume=True)
    assert calls == [] and again.test_auc == whole.test_auc


@pytest.mark.slow
def test_best_weights_are_a_real_copy_and_test_uses_them(small, tmp_path):
    """Selection on val: the saved model is the best val epoch's, not the last one's."""
    from cxrembed.data.cache import ImageSource
    from cxrembed.model import load_encoder
    from cxrembed.data.transforms import to_clip_tensor

    # A head learning rate high enough that val AUC does not rise every epoch.
    result = adapt(small, tmp_path / "run", tiny(epochs=4, lr_head=3e-2, lr_encoder=3e-3),
                   progress=False)
    best = result.history[result.best_epoch - 1]["val_mean_auc"]
    assert best == max(h["val_mean_auc"] for h in result.history)
    enc = load_encoder(checkpoint=tmp_path / "run")
    val = small.split_rows("val")
    x = to_clip_tensor(ImageSource(small).read(val))
    logits = enc.head_logits(enc.encode_image(x)).numpy()
    _, mean, _ = auc_report(small.labels[val], logits)
    assert math.isclose(mean, best, abs_tol=1e-6)  # the model on disk is the best epoch's
    if result.best_epoch != result.epochs_run:
        last = result.history[-1]["val_mean_auc"]
        assert not math.isclose(mean, last, abs_tol=1e-6)


@pytest.mark.slow
def test_adapted_checkpoint_loads_as_encoder_and_refuses_mismatch(small, tmp_path):
    from cxrembed.model import load_encoder as load

    adapt(small, tmp_path / "run", tiny(epochs=1), progress=False)
    meta = json.loads((tmp_path / "run/model.json").read_text())
    assert meta["model"] == "cxr-tiny" and meta["unfreeze"] == 3
    assert meta["labels"] == list(LABELS) and meta["base_weights"]["kind"] == "none"
    enc = load(checkpoint=tmp_path / "run")
    assert enc.has_head and enc.has_text and enc.embed_dim == 512
    assert enc.fingerprint["weights"]["kind"] == "run" and enc.fingerprint["unfreeze"] == 3
    assert enc.fingerprint == load(checkpoint=tmp_path / "run").fingerprint
    assert enc.encode_text(["no effusion"]).shape == (1, 512)
    with pytest.raises(ModelError, match="adapted from cxr-tiny, not ViT-B-32"):
        load(model="ViT-B-32", checkpoint=tmp_path / "run")
    with pytest.raises(ModelError, match="drop --pretrained"):
        load(pretrained="openai", checkpoint=tmp_path / "run")
    # The head's outputs are read by the names the run recorded, in its order; names that
    # do not fit the head's outputs are refused.
    meta["labels"] = list(reversed(LABELS))
    (tmp_path / "run/model.json").write_text(json.dumps(meta))
    assert load(checkpoint=tmp_path / "run").label_names == list(reversed(LABELS))
    meta["labels"] = list(LABELS[:13])
    (tmp_path / "run/model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="13 labels|for a head of 14 outputs"):
        load(checkpoint=tmp_path / "run")
    meta["labels"] = list(LABELS)
    meta["sha256"] = "0" * 64
    (tmp_path / "run/model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="SHA-256"):
        load(checkpoint=tmp_path / "run")


@pytest.mark.slow
def test_run_folder_of_another_run_is_refused(small, tmp_path):
    adapt(small, tmp_path / "run", tiny(epochs=1), progress=False)
    with pytest.raises(ConfigError, match=r"different run \(lr_head: 0\.001 in the run, 0\.002"):
        adapt(small, tmp_path / "run", tiny(epochs=1, lr_head=2e-3), progress=False)
    with pytest.raises(ConfigError, match="different run"):
        adapt(small, tmp_path / "run", tiny(epochs=1, lr_head=2e-3), progress=False, resume=True)
    with pytest.raises(ConfigError, match=r"already holds this run \(epochs: 1 in the run, 2"):
        adapt(small, tmp_path / "run", tiny(epochs=2), progress=False)
    with pytest.raises(ConfigError, match="finished run"):  # test was seen: no more training
        adapt(small, tmp_path / "run", tiny(epochs=2), progress=False, resume=True)
    result = adapt(small, tmp_path / "run", tiny(epochs=1, lr_head=2e-3), progress=False,
                   overwrite=True)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["config"]["lr_head"] == 2e-3 and result.epochs_run == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        adapt(small, tmp_path / "other", tiny(epochs=1), progress=False)
    # --resume where a kill left no run (at most an empty state/) starts it, like encode's
    (tmp_path / "new/state").mkdir(parents=True)
    assert adapt(small, tmp_path / "new", tiny(epochs=1), progress=False,
                 resume=True).epochs_run == 1


@pytest.mark.slow
def test_class_without_val_positives_is_undefined_not_half(small, tmp_path, caplog):
    data = small.subset(np.arange(len(small)))
    data.labels = data.labels.copy()
    val = data.split_rows("val")
    hernia = LABELS.index("Hernia")
    data.labels[val, hernia] = 0
    with caplog.at_level(logging.WARNING, logger="cxrembed.adapt"):
        result = adapt(data, tmp_path / "run", tiny(epochs=1), progress=False)
    assert "Hernia" in result.undefined["val"] and result.val_auc["Hernia"] is None
    assert any("Hernia" in r.getMessage() and "undefined" in r.getMessage()
               for r in caplog.records)
    defined = [v for v in result.val_auc.values() if v is not None]
    assert len(defined) == len(LABELS) - len(result.undefined["val"])
    assert math.isclose(result.val_mean_auc, float(np.mean(defined)), abs_tol=1e-5)

    data.labels[val] = 0
    with pytest.raises(DataError, match="no class has both positives and negatives in val"):
        adapt(data, tmp_path / "run2", tiny(epochs=1), progress=False)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown adapt option.*lr;.*lr_encoder"):
        AdaptConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ConfigError, match="focal_alpha=1.5"):
        AdaptConfig.from_dict({"focal_alpha": 1.5})
    paper = AdaptConfig()
    assert (paper.unfreeze, paper.batch_size, paper.lr_encoder, paper.lr_head,
            paper.weight_decay, paper.grad_clip, paper.focal_alpha, paper.focal_gamma,
            paper.plateau_factor, paper.plateau_patience, paper.seed) == (
        3, 32, 1e-5, 1e-4, 1e-2, 1.0, 0.25, 2.0, 0.5, 2, 7)


def test_unfreeze_beyond_depth_is_a_config_error(small, tmp_path):
    with pytest.raises(ConfigError, match="--unfreeze 9 is out of range: this image tower has 4"):
        adapt(small, tmp_path / "run", tiny(unfreeze=9), progress=False)


def test_focal_loss_matches_torchvision_and_class_weights_use_train_only():
    from torchvision.ops import sigmoid_focal_loss

    from cxrembed.model.loss import focal_bce_with_logits, train_pos_weight

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 14, generator=g) * 3
    targets = (torch.rand(64, 14, generator=g) < 0.2).float()
    want = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
    torch.testing.assert_close(focal_bce_with_logits(logits, targets), want)
    labels = np.zeros((10, 14), np.uint8)
    labels[:2, 0] = 1
    weights = train_pos_weight(labels)
    assert weights[0] == 4.0 and weights[1] == 1.0  # 8 negatives / 2 positives; no positives


@pytest.mark.slow
def test_vit_b32_runs_a_train_step_through_adapt(small, tmp_path):
    steps = []

    def stop(epoch: int, step: int) -> None:
        steps.append((epoch, step))
        raise TrainingInterrupted

    started = []
    with pytest.raises(TrainingInterrupted):
        adapt(small, tmp_path / "run", AdaptConfig(pretrained="none", workers=0, batch_size=4),
              progress=False, on_step=stop, on_start=started.append)
    assert steps == [(1, 1)] and started[0].trainable_params == 22_057_486
    assert started[0].weights == "random init (no pretrained weights)"  # not "none none"


@pytest.mark.slow
def test_cli_saves_the_flags_it_was_given(small, tmp_path):
    from typer.testing import CliRunner

    from cxrembed.cli import app

    root = small.root
    args = ["adapt", str(root), "--out", str(tmp_path / "run"), "--model", "cxr-tiny",
            "--pretrained", "none", "--epochs", "1", "--lr-head", "0.002", "--unfreeze", "2",
            "--batch-size", "16", "--no-augment", "--focal-gamma", "1.5", "--val-fraction",
            "0.2", "--workers", "0", "--device", "cpu", "--no-progress", "--json"]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    saved = json.loads((tmp_path / "run/config.json").read_text())["config"]
    want = dict(AdaptConfig().to_dict(), model="cxr-tiny", pretrained="none", epochs=1,
                lr_head=0.002, unfreeze=2, batch_size=16, augment=False, focal_gamma=1.5,
                val_fraction=0.2, workers=0)
    assert saved == want
    printed = json.loads(outcome.stdout[outcome.stdout.index("{"):])
    assert printed["epochs_run"] == 1 and set(printed["test_auc"]) == set(LABELS)
    bad = CliRunner().invoke(app, args[:-1] + ["--lr-head", "0.003"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)
    assert "different run" in str(bad.exception)


@pytest.mark.slow
def test_encode_refuses_data_split_unlike_the_runs(small, tmp_path):
    """A store whose val/test could hold the run's training images is refused."""
    from cxrembed.data.nih import load_nih
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder as load

    adapt(small, tmp_path / "run", tiny(epochs=1), progress=False)
    encoder = load(checkpoint=tmp_path / "run")
    resplit = load_nih(small.root, val_fraction=0.2, seed=99)  # same images, other val
    assert not np.array_equal(resplit.split, small.split)
    with pytest.raises(ConfigError, match="other data or other splits.*--split-seed"):
        encode_dataset(resplit, tmp_path / "other.h5", encoder, progress=False)
    assert not (tmp_path / "other.h5").exists()
    encode_dataset(resplit, tmp_path / "other.h5", encoder, progress=False, limit=8,
                   allow_other_data=True, index=None)
    result = encode_dataset(small, tmp_path / "same.h5", encoder, progress=False, limit=8,
                            index=None)
    assert result.rows == 8


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_behind(small, tmp_path, monkeypatch):
    """Unknown model, unreachable weights, a folder that is not data: the error comes
    before the first write, so the same --out works once the cause is fixed."""
    from cxrembed.model import TINY_NAME

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without internet
    out = tmp_path / "run"
    for _ in range(2):  # the second try meets the same error, not "already holds this run"
        with pytest.raises(ModelError, match="not in the local cache.*--pretrained"):
            adapt(small, out, AdaptConfig(model="ViT-B-32", pretrained="openai", workers=0),
                  progress=False)
        assert not out.exists()
    with pytest.raises(ModelError, match="unknown model 'ViT-B-33'"):
        adapt(small, out, tiny(model="ViT-B-33"), progress=False)
    with pytest.raises(DataError):
        adapt(tmp_path / "no-such-data", out, tiny(), progress=False)
    with pytest.raises(ConfigError, match="--unfreeze 9"):
        adapt(small, out, tiny(unfreeze=9), progress=False)
    assert not out.exists()
    out.mkdir()  # an empty folder given by the user stays as it was
    with pytest.raises(ModelError):
        adapt(small, out, AdaptConfig(model="ViT-B-32", pretrained="openai"), progress=False)
    assert list(out.iterdir()) == []
    # A training image that cannot be decoded is found before the first write too.
    broken = small.subset(np.arange(len(small)))
    first = broken.split_rows("train")[0]
    (tmp_path / "broken.png").write_bytes(Path(broken.path[first]).read_bytes()[:100])
    broken.path = broken.path.astype(object)
    broken.path[first] = str(tmp_path / "broken.png")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        adapt(broken, out, tiny(epochs=1), progress=False)
    assert list(out.iterdir()) == []
    result = adapt(small, out, tiny(epochs=1, model=TINY_NAME), progress=False)
    assert result.epochs_run == 1


def test_default_workers_fit_the_machine(monkeypatch):
    import warnings

    from cxrembed.adapt import config as config_module
    from cxrembed.adapt.evaluate import batch_loader

    for cpus, want in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(config_module, "usable_cpus", lambda cpus=cpus: cpus)
        assert AdaptConfig().loader_workers == want, cpus
    assert AdaptConfig(workers=3).loader_workers == 3  # a value given is kept
    monkeypatch.undo()
    workers = AdaptConfig().loader_workers
    assert workers < max(config_module.usable_cpus(), 2)

    class Source:
        def read(self, rows):
            return np.zeros((len(rows), 4, 4), np.uint8)

    labels = np.zeros((4, len(LABELS)), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when workers exceed the CPUs
        batches = list(batch_loader(Source(), labels, [np.arange(2), np.arange(2, 4)],
                                    workers, cuda=False))
    assert len(batches) == 2


@pytest.mark.slow
def test_run_files_are_readable_like_any_other_file(small, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        adapt(small, tmp_path / "run", tiny(epochs=1), progress=False)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "model.json", "config.json"}
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode))
             for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def _falling_val_auc(monkeypatch) -> None:
    """Val mean AUC 0.8 at epoch 1, then lower every epoch (deterministic early stop)."""
    from cxrembed.adapt import loop

    real, calls = loop.auc_report, []

    def falling(labels, scores, *mask_and_names):
        aucs, _, undefined = real(labels, scores, *mask_and_names)
        calls.append(1)
        return aucs, 0.8 - 0.01 * (len(calls) - 1), undefined

    monkeypatch.setattr(loop, "auc_report", falling)


@pytest.mark.slow
def test_early_stop_is_said_in_the_log_summary_metrics_and_cli(small, tmp_path, monkeypatch,
                                                               caplog):
    from typer.testing import CliRunner

    from cxrembed.cli import app

    _falling_val_auc(monkeypatch)
    want = "stopped early at epoch 3 of 5: no val AUC gain for 2 epochs (best 0.8000 at epoch 1)"
    with caplog.at_level(logging.INFO, logger="cxrembed.adapt"):
        result = adapt(small, tmp_path / "run", tiny(epochs=5, early_stop_patience=2),
                       progress=False)
    assert result.stopped_early and result.epochs_run == 3 and result.stop_reason == want
    assert want in caplog.text
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["stop_reason"] == want and summary["epochs"] == 5
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert lines[2]["stopped_early"] == want and lines[-1]["stop_reason"] == want

    _falling_val_auc(monkeypatch)
    args = ["adapt", str(small.root), "--out", str(tmp_path / "cli"), "--model", "cxr-tiny",
            "--pretrained", "none", "--epochs", "5", "--early-stop-patience", "2",
            "--val-fraction", "0.2", "--workers", "0", "--lr-encoder", "0.001", "--lr-head",
            "0.001", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    outcome = CliRunner().invoke(app, args, terminal_width=200)
    assert outcome.exit_code == 0, outcome.output
    assert want in " ".join(outcome.output.split())
    whole = adapt(small, tmp_path / "run2", tiny(epochs=2), progress=False)
    assert not whole.stopped_early and whole.stop_reason is None


def test_config_file_is_read_by_the_config_class(tmp_path):
    path = tmp_path / "adapt.json"
    path.write_text(json.dumps({"epochs": 3, "lr_head": 0.002}))
    config = AdaptConfig.from_file(path, {"epochs": 4, "lr_encoder": None})
    assert (config.epochs, config.lr_head, config.lr_encoder) == (4, 0.002, 1e-5)
    path.write_text(json.dumps({"config": {"epochs": 2}, "data": {}}))  # a run's config.json
    assert AdaptConfig.from_file(path).epochs == 2
    path.write_text(json.dumps({"epoch": 2}))
    with pytest.raises(ConfigError, match=r"adapt\.json: unknown adapt option\(s\) epoch"):
        AdaptConfig.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="adapt.json holds a JSON list"):
        AdaptConfig.from_file(path)
    with pytest.raises(ConfigError, match="cannot read the adapt config file"):
        AdaptConfig.from_file(tmp_path / "missing.json")


@pytest.mark.slow
def test_cli_failed_start_leaves_no_run_behind(small, tmp_path):
    """`cxrembed adapt --pretrained openai` without internet: exit 1 with the reason, no
    folder written, and the same command then fails for the same reason."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "cxrembed", "adapt", str(small.root), "--out",
            str(tmp_path / "run"), "--pretrained", "openai", "--workers", "0", "--no-progress"]
    for _ in range(2):
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "not in the local cache" in done.stdout + done.stderr
        assert "already holds" not in done.stdout + done.stderr
        assert not (tmp_path / "run").exists()
