"""torchrun: a pixel cache decoded by 2 gloo processes, one shard each, joined by rank 0,
holds the bytes of a one-process cache; a rank killed mid-way resumes its own shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxrembed.data import load_nih
from cxrembed.data.cache import PixelCache, build_one_cache, build_pixel_cache
from cxrembed.data.cache_shards import join_caches
from cxrembed.distributed import rank_share
from cxrembed.errors import DataError

#: rank 1 of a torchrun job dies by SIGKILL right after committing its third block
KILL_RANK_1 = textwrap.dedent("""
    import os, signal, sys
    import cxrembed.data.cache as cache
    from cxrembed.data import load_nih

    cache.BLOCK = 16
    if os.environ["RANK"] == "1":
        commit, blocks = cache._commit_block, []

        def commit_then_die(*args):
            commit(*args)
            blocks.append(1)
            if len(blocks) == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        cache._commit_block = commit_then_die
    cache.build_pixel_cache(load_nih(sys.argv[1]), sys.argv[2], workers=0, progress=False,
                            skip_bad=True)
""")


def torchrun(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a script, or ``-m cxrembed ...``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def cache_bytes(path: Path) -> dict:
    """What a reader of the cache gets: pixels, ids, done flags, skipped images."""
    with h5py.File(path, "r") as f:
        return {"pixels": f["pixels"][:], "image_id": f["image_id"].asstr()[:],
                "done": f["done"][:], "skipped": json.loads(f.attrs["skipped"]),
                "complete": bool(f.attrs["complete"]), "size": int(f.attrs["size"])}


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = cache_bytes(a), cache_bytes(b)
    assert x.keys() == y.keys()
    for key in x:
        if isinstance(x[key], np.ndarray):
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key
        else:
            assert x[key] == y[key], key


@pytest.fixture
def data_with_a_bad_image(twin, tmp_path) -> tuple[Path, str]:
    """The twin with one unreadable image, in rank 0's share of 2."""
    root = tmp_path / "nih"
    shutil.copytree(twin, root)
    dataset = load_nih(root)
    Path(dataset.path[50]).write_bytes(b"not a png")
    return root, str(dataset.image_id[50])



def _three_shards(dataset, folder, *, skip_bad: bool, name: str = "px.h5") -> list:
    """The shards three ranks build of ``dataset`` (``NAME.shard-R-of-3.h5``), built here
    in one process by the one-process cache code, as each rank does."""
    parts = []
    for rank in range(3):
        start, stop = rank_share(len(dataset), 3, rank)
        parts.append(folder / f"{name}.shard-{rank}-of-3.h5")
        build_one_cache(dataset.subset(np.arange(start, stop)), parts[-1], size=224,
                        decoder="opencv", workers=0, overwrite=False, progress=False,
                        skip_bad=skip_bad)
    return parts


def test_shards_joined_either_way_read_as_one_cache(data_with_a_bad_image, tmp_path):
    """Shards of consecutive rows, joined as a virtual dataset or by copy, read as the
    one-process cache does; a virtual cache whose shard is gone is refused, naming it."""
    root, bad = data_with_a_bad_image
    dataset = load_nih(root).subset(np.arange(60))
    one = build_pixel_cache(dataset, tmp_path / "one.h5", workers=0, progress=False,
                            skip_bad=True)
    parts = _three_shards(dataset, tmp_path, skip_bad=True)
    for how in ("virtual", "copy"):
        joined = join_caches(tmp_path / f"{how}.h5", parts, how)
        assert_same_cache(joined, one)
        cache = PixelCache(joined)
        rows = np.array([59, 3, 21, 20, 3])  # across shards, unordered, repeated
        assert np.array_equal(cache.read(rows), PixelCache(one).read(rows))
        assert np.array_equal(cache.read(np.arange(18, 44)), PixelCache(one).read(
            np.arange(18, 44)))
        assert cache.skipped.keys() == {bad}
        cache.close()
    with h5py.File(tmp_path / "virtual.h5", "r") as f:
        assert f["pixels"].is_virtual
    with h5py.File(tmp_path / "copy.h5", "r") as f:
        assert not f["pixels"].is_virtual
    parts[1].rename(tmp_path / "elsewhere.h5")
    with pytest.raises(DataError, match=r"shard .*px\.h5\.shard-1-of-3\.h5, which is not there"):
        PixelCache(tmp_path / "virtual.h5")
    assert len(PixelCache(tmp_path / "copy.h5")) == 60  # self-contained


def test_shards_of_another_process_count_are_refused_unless_they_are_the_cache(twin, tmp_path):
    """Shards of a 3-process build cover other rows than 2 processes (or 1) would decode:
    refused, naming the count to continue with; but the shards a finished (virtual) cache
    reads from are its data, and a finished cache is left as it is. --overwrite removes
    the cache with its shards."""
    from cxrembed.data.cache_shards import build_cache_shards
    from cxrembed.distributed import Launch

    dataset = load_nih(twin).subset(np.arange(30))
    out = tmp_path / "px.h5"
    parts = _three_shards(dataset, tmp_path, skip_bad=False)
    options = dict(size=224, decoder="opencv", workers=0, overwrite=False, progress=False,
                   skip_bad=False)
    refused = r"3 shard\(s\) of an earlier pixel cache .* with 3 processes .* --nproc_per_node 3"
    with pytest.raises(DataError, match=refused + r", or pass --overwrite to start over with 2"):
        build_cache_shards(dataset, out, Launch(0, 2), **options)  # rank 0 of a torchrun job
    with pytest.raises(DataError, match=refused):
        build_pixel_cache(dataset, out, workers=0, progress=False)  # one process
    assert not out.exists()

    join_caches(out, parts, "virtual")
    before = {p: p.stat().st_mtime_ns for p in [out, *parts]}
    assert build_cache_shards(dataset, out, Launch(0, 2), **options) == out
    assert build_pixel_cache(dataset, out, workers=0, progress=False) == out
    assert {p: p.stat().st_mtime_ns for p in [out, *parts]} == before  # untouched

    build_pixel_cache(dataset, out, workers=0, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["px.h5"]
    cache = PixelCache(out)
    assert len(cache) == 30 and cache.done.all()


def test_shards_of_other_preprocessing_are_neither_joined_nor_resumed(twin, tmp_path):
    """Shards decoded by another cxrembed (other preprocessing or format attribute), e.g.
    left by a torchrun build interrupted before an upgrade, are refused by the join
    (which would stamp them as current) and by the resume, naming the file and
    --overwrite; a one-process cache of other preprocessing is not resumed either."""
    dataset = load_nih(twin).subset(np.arange(12))
    parts = _three_shards(dataset, tmp_path, skip_bad=False)
    with h5py.File(parts[1], "a") as f:
        f.attrs["preprocessing"] = '{"decode": "something else"}'
    for how in ("virtual", "copy"):
        with pytest.raises(DataError, match=r"px\.h5\.shard-1-of-3\.h5 holds pixels decoded "
                                            r"with other preprocessing .*pass --overwrite"):
            join_caches(tmp_path / "px.h5", parts, how)
    assert not (tmp_path / "px.h5").exists()
    start, stop = rank_share(len(dataset), 3, 1)
    options = dict(size=224, decoder="opencv", workers=0, overwrite=False, progress=False,
                   skip_bad=False)
    with pytest.raises(DataError, match=r"shard-1-of-3\.h5 holds pixels .*--overwrite"):
        build_one_cache(dataset.subset(np.arange(start, stop)), parts[1], **options)  # a rank
    with h5py.File(parts[2], "a") as f:  # the current preprocessing, another format
        f.attrs["format"] = 0
    with pytest.raises(DataError, match=r"shard-2-of-3\.h5 holds pixels .*format 0"):
        build_one_cache(dataset.subset(np.arange(stop, len(dataset))), parts[2], **options)
    with pytest.raises(DataError, match=r"shard-2-of-3\.h5 holds pixels .*format 0"):
        join_caches(tmp_path / "px.h5", [parts[0], parts[2]])
    with pytest.raises(DataError, match=r"shard-1-of-3\.h5 holds pixels"):  # one process
        build_pixel_cache(dataset.subset(np.arange(start, stop)), parts[1], workers=0,
                          progress=False)


def test_shard_names_are_matched_literally(tmp_path):
    """``--out`` is a file name, not a pattern: shards of ``px[1].h5`` are found (refused
    or removed as they should be), those of ``px1.h5`` are not, and a file whose name only
    looks like a shard's (``px[1].h5.shard-a-of-b.h5``) is left alone, not a traceback."""
    from cxrembed import sharding

    out = tmp_path / "px[1].h5"
    names = [f"px[1].h5.shard-{r}-of-3.h5" for r in range(3)] + [
        "px[1].h5.shard-0-of-3.h5.done", "px[1].h5.shard-2-of-3.h5.tmp",
        "px[1].h5.shard-a-of-b.h5", "px1.h5.shard-0-of-2.h5", "px[1].h5.shard-1-of-2.h5x"]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in sharding.all_shards(out)] == names[:3]
    refused = r"3 shard\(s\) of an earlier pixel cache .*with 3 processes.* start over with 2"
    with pytest.raises(DataError, match=refused):
        sharding.refuse_other_world_shards(out, 2, what="pixel cache", resume="",
                                           error=DataError)
    sharding.refuse_other_world_shards(out, 3, what="pixel cache", resume="", error=DataError)
    sharding.remove_all_shards(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[-3:])


def test_a_failed_overwrite_leaves_no_cache_pointing_at_removed_shards(twin, tmp_path,
                                                                        monkeypatch):
    """One-process --overwrite of a virtual cache removes the cache with its shards: when
    the new build then fails (here: no space), no cache is left whose shards are gone.
    Its shards are found although its name holds a glob character."""
    import cxrembed.data.cache as cache_mod

    dataset = load_nih(twin).subset(np.arange(12))
    out = tmp_path / "px[1].h5"
    join_caches(out, _three_shards(dataset, tmp_path, skip_bad=False, name=out.name))

    def no_space(*args):
        raise DataError("not enough space")

    monkeypatch.setattr(cache_mod, "check_space", no_space)
    with pytest.raises(DataError, match="not enough space"):
        build_pixel_cache(dataset, out, workers=0, progress=False, overwrite=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    build_pixel_cache(dataset, out, workers=0, progress=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert PixelCache(out).done.all()


@pytest.mark.slow
def test_two_ranks_cache_as_one_process_and_a_killed_rank_resumes(data_with_a_bad_image,
                                                                    tmp_path):
    """Rank 1 is killed (SIGKILL) after 3 blocks of its share: the job fails, its shard
    keeps those rows, and a one-process build refuses to start over beside the 2-process
    shards. The torchrun command run again resumes rank 1's shard where it stopped, and
    rank 0 joins a cache holding the one-process cache's pixels, ids and skipped image."""
    root, bad = data_with_a_bad_image
    dataset = load_nih(root)
    reference = build_pixel_cache(dataset, tmp_path / "one.h5", workers=0, progress=False,
                                  skip_bad=True)
    out = tmp_path / "two" / "px.h5"
    out.parent.mkdir()
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)

    killed = torchrun(script, root, out)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not out.exists()
    shard = out.with_name("px.h5.shard-1-of-2.h5")
    with h5py.File(shard, "r") as f:  # a kill -9 mid-way: 3 blocks of 16 rows kept
        assert not f.attrs["complete"] and f["done"][:].sum() == 48
    with pytest.raises(DataError, match=r"with 2 processes .*--nproc_per_node 2, or pass "
                                        r"--overwrite"):
        build_pixel_cache(dataset, out, workers=0, progress=False, skip_bad=True)

    done = torchrun("-m", "cxrembed", "-v", "cache", root, "--out", out, "--workers=0",
                    "--skip-bad", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    start, stop = rank_share(len(dataset), 2, 1)
    assert f"resuming: 48 of {stop - start} rows already cached" in " ".join(output.split())
    assert f"skipped {bad}" in output and "cached 240 images" in output
    assert_same_cache(out, reference)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "px.h5", "px.h5.shard-0-of-2.h5", "px.h5.shard-1-of-2.h5"]  # markers removed


def test_joined_state_says_what_to_do_with_an_unfinished_or_unreadable_file(tmp_path):
    """Before a sharded run, rank 0 looks at ``--out``: absent, finished, or a file only a
    one-process run can continue (or not HDF5 at all), each refused with what to run."""
    import h5py

    from cxrembed import sharding
    from cxrembed.errors import DataError

    out = tmp_path / "px.h5"
    check = dict(thing="pixel cache", one_process="`cxrembed cache`", error=DataError)
    assert sharding.joined_state(out, **check) is None
    with h5py.File(out, "w") as f:
        f.attrs["complete"] = False
    with pytest.raises(DataError, match="started by a one-process `cxrembed cache`; continue "
                       "it with the same command without torchrun, or pass --overwrite"):
        sharding.joined_state(out, **check)
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = True
    assert sharding.joined_state(out, **check) == "complete"
    out.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable pixel cache .*pass --overwrite"):
        sharding.joined_state(out, **check)
