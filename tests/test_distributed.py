"""torchrun: 2 gloo processes on the CPU train and encode as 1 process does.

Each test launches the installed command under ``python -m torch.distributed.run`` (what
``torchrun`` runs) in a subprocess, with the same data, seed and global batch as an
in-process, one-process reference. A launch costs a few seconds of start-up (two
processes importing torch and open_clip), so launches are few and the data tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cxrembed.distributed import Launch, rank_share

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(model="cxr-tiny", pretrained="none", workers=0, lr_encoder=1e-3, lr_head=1e-3,
            batch_size=16, val_fraction=0.2, eval_batch_size=8)


def torchrun(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m cxrembed ARGS`` (the installed code)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "cxrembed", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def cli_flags(config: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]


def one_pair(labels: np.ndarray) -> np.ndarray:
    """Per class, the AUC change of one positive/negative pair changing order (1/(P·N)):
    the most that logits equal to ~1e-6 may move an AUC."""
    pos = labels.sum(axis=0)
    return 1.0 / np.maximum(pos * (len(labels) - pos), 1)


def assert_same_aucs(a: dict, b: dict, labels: np.ndarray, names: list[str]) -> None:
    tolerance = one_pair(labels)
    for i, name in enumerate(names):
        if a[name] is None or b[name] is None:
            assert a[name] == b[name], name
        else:
            assert abs(a[name] - b[name]) <= tolerance[i] + 1e-6, (name, a[name], b[name])


# ---------------------------------------------------------------------------------------
# Pure functions: the shares and the slices of a global batch


def test_rank_shares_cover_every_row_once_cut_at_batches():
    for count, world, multiple in [(10, 2, 1), (10, 3, 4), (3, 4, 1), (0, 2, 8), (257, 2, 64)]:
        shares = [rank_share(count, world, r, multiple) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in order
        assert all(start % multiple == 0 for start, _ in shares)
        sizes = [-(-(stop - start) // multiple) for start, stop in shares]
        assert max(sizes) - min(sizes) <= 1  # whole batches, balanced


def test_a_rank_whose_rows_have_no_known_label_still_counts_them():
    """Its loss share is 0 (no known cell), but its rows are real images, not stand-ins:
    the epoch's images seen and images/s must equal one process's."""
    from cxrembed.adapt.loop import rank_steps
    known = np.ones((8, 3), dtype=bool)
    known[4:] = False
    steps = [rank_steps([np.arange(8)], Launch(r, 2), known)[0] for r in (0, 1)]
    assert [s.share for s in steps] == [1.0, 0.0]
    assert [s.stand_in for s in steps] == [False, False]
    assert rank_steps([np.arange(1)], Launch(1, 2))[0].stand_in


def test_shards_of_another_process_count_are_refused_naming_them(tmp_path):
    """Shards of a 3-process encode cover other rows than a 2-process one would: resuming
    with 2 must not silently start over beside them."""
    from cxrembed.encode.shards import _refuse_other_world_shards
    from cxrembed.errors import StoreError

    out = tmp_path / "s.h5"
    _refuse_other_world_shards(out, 2)  # nothing there
    (tmp_path / "s.h5.shard-0-of-2.h5").write_bytes(b"")
    _refuse_other_world_shards(out, 2)  # its own shards are what --resume continues
    (tmp_path / "s.h5.shard-1-of-3.h5").write_bytes(b"")
    with pytest.raises(StoreError, match=r"with 3 processes.*--nproc_per_node 3 --resume"):
        _refuse_other_world_shards(out, 2)


def test_rank_steps_slice_each_global_batch_and_weigh_the_last_one():
    from cxrembed.adapt.loop import rank_steps

    batches = [np.arange(0, 8), np.arange(8, 11)]  # global batch 8, a last batch of 3
    for world in (1, 2, 4):
        steps = [rank_steps(batches, Launch(r, world)) for r in range(world)]
        for k, batch in enumerate(batches):
            parts = [s[k] for s in steps]
            real = [p for p in parts if p.share > 0]
            assert np.array_equal(np.concatenate([p.rows for p in real]), batch)
            assert sum(p.share for p in parts) == pytest.approx(1.0)
            for p in real:  # each slice sits where its rows are in the global batch
                assert np.array_equal(batch[p.offset:p.offset + len(p.rows)], p.rows)
                assert p.share == len(p.rows) / len(batch) and p.size == len(batch)
    # 3 rows over 4 ranks: the rank left without a row trains on a stand-in, weight 0.
    last = rank_steps(batches, Launch(3, 4))[1]
    assert last.share == 0 and len(last.rows) == 1
    # Unknown labels: the masked loss is a mean over known cells, so shares follow them.
    known = np.ones((11, 3), bool)
    known[:4, :2] = False  # rows 0-3 have 1 known cell, rows 4-7 have 3
    first = [rank_steps(batches, Launch(r, 2), known)[0] for r in (0, 1)]
    assert [p.share for p in first] == [pytest.approx(4 / 16), pytest.approx(12 / 16)]


def test_global_batch_must_split_evenly_over_the_processes():
    from cxrembed.adapt import AdaptConfig
    from cxrembed.adapt.loop import check_global_batch
    from cxrembed.errors import ConfigError

    config = AdaptConfig.from_dict(dict(TINY, batch_size=32))
    check_global_batch(config, Launch(0, 4))  # 4 x 8
    check_global_batch(config, Launch(0, 1))
    with pytest.raises(ConfigError, match=r"--batch-size 32 .* 3 processes .* e\.g\. 33"):
        check_global_batch(config, Launch(2, 3))


def test_dropout_and_augmentation_slices_equal_the_whole_batch_draws():
    import torch

    from cxrembed.adapt.draws import BatchDraws
    from cxrembed.data.transforms import TrainAugment

    images = torch.randint(0, 255, (6, 32, 32), dtype=torch.uint8)
    whole = TrainAugment()(images, generator=torch.Generator().manual_seed(3))
    halves = [TrainAugment()(images[o:o + 3], generator=torch.Generator().manual_seed(3),
                             draw=(6, o)) for o in (0, 3)]
    assert torch.equal(torch.cat(halves), whole)

    draws = BatchDraws()
    draws.reseed(5)
    draws.step(6, 0)
    mask = draws.keep_mask(torch.Size((6, 4)), 0.5)
    parts = []
    for offset in (0, 2, 4):
        draws.reseed(5)
        draws.step(6, offset)
        parts.append(draws.keep_mask(torch.Size((2, 4)), 0.5))
    assert torch.equal(torch.cat(parts), mask)


# ---------------------------------------------------------------------------------------
# adapt under torchrun


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_under_torchrun(twin, tmp_path):
    """A run resumed under torchrun (2 gloo ranks, global batch 16 = 2 x 8) from a
    one-process checkpoint trains as one process does: same losses, val and test AUCs
    (to one pair at most: the weights agree to ~1e-5), same best epoch; rank 0 alone
    wrote the run folder."""
    import shutil

    from safetensors.torch import load_file

    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.data.nih import load_nih
    from cxrembed.labels import LABELS

    dataset = load_nih(twin, val_fraction=0.2)

    def keep_epoch_one(epoch: int, step: int) -> None:
        if (epoch, step) == (2, 1):  # the folder as a kill during epoch 2 leaves it
            shutil.copytree(tmp_path / "one", tmp_path / "two")

    reference = adapt(dataset, tmp_path / "one", AdaptConfig.from_dict(dict(TINY, epochs=2)),
                      progress=False, on_step=keep_epoch_one)
    assert json.loads((tmp_path / "two/state/progress.json").read_text())["epochs_done"] == 1
    began = time.monotonic()
    done = torchrun("adapt", twin, "--out", tmp_path / "two", "--resume", "--epochs=2",
                    "--device=cpu", "--no-progress", "--json", *cli_flags(TINY))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one document: rank 1 printed nothing
    print(f"torchrun adapt: {time.monotonic() - began:.1f} s")

    assert [h["epoch"] for h in result["history"]] == [1, 2]
    val = dataset.labels[dataset.split_rows("val")]
    for one, two in zip(reference.history, result["history"]):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert_same_aucs(one["val_auc"], two["val_auc"], val, list(LABELS))
    assert result["best_epoch"] == reference.best_epoch
    assert_same_aucs(reference.test_auc, result["test_auc"],
                     dataset.labels[dataset.split_rows("test")], list(LABELS))
    a, b = load_file(str(tmp_path / "one/model.safetensors")), \
        load_file(str(tmp_path / "two/model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    lines = (tmp_path / "two/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("epoch") for x in lines] == [1, 2, None]  # each line once


# ---------------------------------------------------------------------------------------
# encode under torchrun


@pytest.mark.slow
def test_failing_rank_ends_the_job_then_resumed_shards_join_as_one_encode(twin, tmp_path):
    """Rank 1 meets an unreadable image in its share: the job ends non-zero within a
    bounded time (rank 0 does not wait for it), naming the rank and the image. The same
    command with --resume --skip-bad finishes: rank 0 joins the two shards into a store
    equal, row for row, to a one-process encode with --skip-bad, and builds its index."""
    import shutil

    import h5py

    from cxrembed.data.nih import load_nih
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder
    from cxrembed.store import EmbeddingStore, load_index

    data = tmp_path / "nih"
    shutil.copytree(twin, data)
    dataset = load_nih(data)
    batch = 16
    start, _ = rank_share(len(dataset), 2, 1, batch)  # rank 1's first image: it fails at once
    bad = dataset.image_id[start]
    Path(dataset.path[start]).write_bytes(b"not a png")
    out = tmp_path / "two" / "store.h5"
    command = ["encode", data, "--out", out, "--model=cxr-tiny", "--pretrained=none",
               f"--batch-size={batch}", "--device=cpu", "--no-progress", "--workers=0"]

    began = time.monotonic()
    failed = torchrun(*command, timeout=300)
    seconds = time.monotonic() - began
    assert failed.returncode != 0
    assert "rank 1 of 2" in failed.stderr and bad in failed.stderr, failed.stderr[-3000:]
    assert seconds < 240  # the other rank was stopped, not left waiting (timeout: 1800 s)
    assert not out.exists()

    done = torchrun(*command, "--resume", "--skip-bad", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # rank 0's only
    assert result["rows"] == len(dataset) - 1 and [s["rank"] for s in result["shards"]] == [0, 1]
    assert [s["image_id"] for s in result["skipped"]] == [bad]
    assert sorted(p.name for p in out.parent.iterdir()) == ["store.faiss", "store.faiss.json",
                                                           "store.h5"]  # shards removed

    one = tmp_path / "one" / "store.h5"
    encode_dataset(dataset, one, load_encoder("cxr-tiny", "none", device="cpu"),
                   batch_size=batch, workers=0, skip_bad=True, progress=False)
    with h5py.File(one, "r") as a, h5py.File(out, "r") as b:
        assert set(a) == set(b)
        for name in ("image_id", "patient_id", "split", "labels", "label_known", "image_path",
                     "embedding", "embedding_norm", "age"):
            assert np.array_equal(a[name][:], b[name][:], equal_nan=name == "age"), name
        assert np.array_equal(a["text/embedding"][:], b["text/embedding"][:])
        for key in ("num_rows", "complete", "selection", "skipped_images", "fingerprint"):
            assert a.attrs[key] == b.attrs[key], key
    with EmbeddingStore.open(out) as store:  # the index belongs to the joined store
        assert load_index(store).index.ntotal == len(store) == len(dataset) - 1
