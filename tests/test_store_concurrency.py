"""A store read while another process writes it, and two writers of one store.

The writer is a real second process (``python -c``) that writes chunks in lockstep with
the test (it waits for a line on stdin after each chunk, and the test checks the rows of
each), then freely while the test reads (what a read sees then depends on timing: final
rows or a StoreError, nothing else is asserted of it), then finishes; another is killed
with SIGKILL mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cxrembed.errors import StoreError
from cxrembed.store import EmbeddingStore, StoreWriter
from cxrembed.store import lock as store_lock

N, DIM, CHUNK = 400, 8, 40
FINGERPRINT = {"model": "concurrency"}

WRITER = textwrap.dedent(f"""
    import sys, time
    import numpy as np
    from cxrembed.store import StoreWriter
    from cxrembed.store.schema import ROW_FIELDS
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    from test_store_concurrency import expected_rows, rows_of
    path, mode = sys.argv[1], sys.argv[2]
    w = StoreWriter.create(path, rows=rows_of({N}), embed_dim={DIM}, fingerprint={FINGERPRINT!r},
                           has_head=False, has_text=False, batch_size={CHUNK},
                           chunk_rows={CHUNK})
    for start in range(0, {N}, {CHUNK}):
        w.append(expected_rows(start, start + {CHUNK}))
        print(w.rows_done, flush=True)
        if mode == "lockstep" and sys.stdin.readline().strip() != "go":
            mode = "free"
        if mode == "free":
            time.sleep(0.05)  # the reader gets several looks while rows are added
    w.finish()
    w.close()
    print("done", flush=True)
""")


def expected_rows(start: int, stop: int) -> np.ndarray:
    """Row ``i`` holds ``i mod 97 + j / 8`` in column ``j`` (exact in float16)."""
    rows = np.arange(start, stop)[:, None] % 97 + np.arange(DIM)[None, :] / 8
    return rows.astype(np.float32)


def rows_of(n: int) -> dict:
    from cxrembed.store.schema import ROW_FIELDS

    return {name: (np.array([f"{i:04d}.png" for i in range(n)]) if name == "image_id" else
                   np.array(["train"] * n) if name == "split" else
                   np.zeros((n, 14), np.uint8) if name == "labels" else
                   np.array([""] * n) if kind == "S" else np.zeros(n, kind))
            for name, kind in ROW_FIELDS.items()}


def _start_writer(path, mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _final_rows_only(path) -> int:
    """Open the store being written: every row it shows is the one the writer wrote."""
    with EmbeddingStore.open(path, allow_incomplete=True) as store:
        n = len(store)
        np.testing.assert_array_equal(store.embeddings(normalized=False), expected_rows(0, n))
        return n


@pytest.mark.timeout(120)
def test_reader_sees_final_rows_or_a_clear_error_and_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    writer = _start_writer(path, "lockstep")
    try:
        assert writer.stdout.readline().strip() == str(CHUNK)
        with pytest.raises(StoreError, match=rf"being written by process {writer.pid} on .*"
                                             r"cxrembed store writer"):
            EmbeddingStore.open(path)
        assert _final_rows_only(path) == CHUNK
        owner = json.loads(store_lock.lock_path(path).read_text())
        assert owner["pid"] == writer.pid
        # a second writer, by any door: refused, naming the first and what to do
        for second in (lambda: StoreWriter.resume(path, fingerprint=FINGERPRINT),
                       lambda: StoreWriter.create(path, rows=rows_of(N), embed_dim=DIM,
                                                  fingerprint=FINGERPRINT, has_head=False,
                                                  has_text=False, batch_size=CHUNK,
                                                  chunk_rows=CHUNK)):
            with pytest.raises(StoreError, match=rf"process {writer.pid} .*remove .*s\.h5\.lock"):
                second()
        from cxrembed.encode.pipeline import encode_dataset

        with pytest.raises(StoreError, match=rf"process {writer.pid}"):
            encode_dataset(None, path, None, overwrite=True)  # refused before touching it
        assert _final_rows_only(path) == CHUNK  # --overwrite did not remove it
        for done in range(2 * CHUNK, N // 2 + 1, CHUNK):  # lockstep: each chunk is seen
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == str(done)
            assert _final_rows_only(path) == done
        writer.stdin.write("free\n")  # from here on the writer does not wait for us
        writer.stdin.flush()
        seen = []
        while writer.poll() is None:  # races by design: final rows or a StoreError
            try:
                seen.append(_final_rows_only(path))
            except StoreError:  # e.g. the instant the finished store is swapped in
                pass
        assert writer.stdout.read().strip().endswith("done")
        assert writer.returncode == 0
    finally:
        writer.kill()
        writer.wait()
    assert seen == sorted(seen) and all(n % CHUNK == 0 and N // 2 <= n <= N for n in seen)
    with EmbeddingStore.open(path) as store:  # finished: no lock, every row
        assert store.complete and len(store) == N
    assert not store_lock.lock_path(path).exists()


@pytest.mark.timeout(120)
def test_a_writer_killed_mid_write_leaves_no_lock_in_the_way(tmp_path):
    path = tmp_path / "s.h5"
    writer = _start_writer(path, "lockstep")
    assert writer.stdout.readline().strip() == str(CHUNK)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert store_lock.lock_path(path).exists()  # the file stays; the kernel freed its lock
    with pytest.raises(StoreError, match="incomplete"):  # not "being written"
        EmbeddingStore.open(path)
    with StoreWriter.resume(path, fingerprint=FINGERPRINT) as resumed:
        assert resumed.rows_done == CHUNK
        for start in range(CHUNK, N, CHUNK):
            resumed.append(expected_rows(start, start + CHUNK))
        resumed.finish()
    assert _final_rows_only(path) == N


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """Where flock is unavailable (some network file systems) the lock file's pid is used:
    a dead process's lock is taken over, a live or remote one refused by name."""
    monkeypatch.setattr(store_lock, "fcntl", None)
    store = tmp_path / "s.h5"
    lock = store_lock.lock_path(store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    here = socket.gethostname()
    parent, born = os.getppid(), store_lock.process_start(os.getppid())
    assert born is not None  # Linux: /proc/PID/stat
    for pid, start, host, refused in (
            (int(dead.stdout), None, here, False),
            (parent, born, here, True),  # alive, the same process
            (parent, born + 1, here, False),  # the pid now names a later process: reused
            (parent, None, here, True),  # a lock written before start times were recorded
            (12345, None, "another-host", True)):
        lock.write_text(json.dumps({"pid": pid, "pid_start": start, "host": host,
                                    "purpose": "cxrembed encode",
                                    "started": "2026-12-01T00:00:00+00:00"}))
        if refused:
            assert store_lock.writer_at_work(store)["pid"] == pid
            with pytest.raises(StoreError, match=rf"process {pid} on {host} .*"
                                                 rf"stale if.*ps -o lstart=,args= -p {pid}"
                                                 r".*remove"):
                store_lock.acquire(store, "test")
        else:
            assert store_lock.writer_at_work(store) is None
            with store_lock.store_lock(store, "test"):
                taken = json.loads(lock.read_text())
                assert taken["pid"] == os.getpid()
                assert taken["pid_start"] == store_lock.process_start(os.getpid())
            assert not lock.exists()


def _png(path) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16), 100, np.uint8))


def test_a_failed_encode_start_leaves_no_new_out_folder(tmp_path):
    """issue 9 item 10: the lock creates a new --out folder; a start that fails (a bad
    option, weights that cannot load) removes it again; a folder that was there stays."""
    from cxrembed.data.readers import load_dataset
    from cxrembed.encode.pipeline import encode_dataset
    from cxrembed.errors import ConfigError

    with pytest.raises(ConfigError, match="batch size 0"):
        encode_dataset(None, tmp_path / "new" / "deeper" / "s.h5", None, batch_size=0)
    assert not (tmp_path / "new").exists()
    data = tmp_path / "data"
    for name in ("normal/n.png", "mass/m.png"):
        _png(data / name)
    dataset = load_dataset(data, "folders")

    def bogus_weights():
        raise ConfigError("unknown pretrained tag 'bogus-tag'")

    with pytest.raises(ConfigError, match="bogus-tag"):
        encode_dataset(dataset, tmp_path / "new" / "s.h5", bogus_weights)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ConfigError, match="batch size 0"):
        encode_dataset(None, tmp_path / "kept" / "s.h5", None, batch_size=0)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_under_torchrun_only_rank_0_takes_the_store_lock(tmp_path, monkeypatch):
    """A sharded encode's ranks all call encode_dataset(out=STORE): rank 0 holds STORE's
    lock, the others write only their shards (each locked by its writer)."""
    calls = []

    @store_lock.holding_lock("out", "test")
    def encode(out):
        calls.append(store_lock.lock_path(out).exists())

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, holds in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        encode(tmp_path / "s.h5")
        assert calls[-1] is holds


def _small_store(path, n=30, complete=True):
    with StoreWriter.create(path, rows=rows_of(n), embed_dim=DIM, fingerprint=FINGERPRINT,
                            has_head=False, has_text=False, batch_size=10,
                            chunk_rows=10) as writer:
        writer.append(expected_rows(0, 10 if not complete else n))
        if complete:
            writer.finish()
    return path


def test_a_store_unreadable_while_written_says_it_is_being_written(tmp_path, monkeypatch):
    """Opened for its final rows while another process writes it: a file HDF5 cannot open
    or a header that fails the checks at that moment is the writer's doing, said so."""
    import h5py

    from cxrembed.store import reader

    owner = {"pid": 4242, "host": "here", "purpose": "cxrembed encode", "started": "now"}
    monkeypatch.setattr(reader, "writer_at_work", lambda path: owner)
    busy = r"being written by process 4242 on here .*cannot be read at this moment"
    garbage = tmp_path / "g.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a header being written
    with pytest.raises(StoreError, match=busy):
        EmbeddingStore.open(garbage, allow_incomplete=True)
    torn = _small_store(tmp_path / "s.h5")
    with h5py.File(torn, "r+") as f:
        f.attrs["num_rows"] = 40  # attributes not yet matching the arrays
    with pytest.raises(StoreError, match=busy):
        EmbeddingStore.open(torn, allow_incomplete=True)


def _outside_parentheses(message: str) -> str:
    import re

    while "(" in message:
        message = re.sub(r"\([^()]*\)", "", message)
    return message


def test_refusals_tell_a_command_line_user_what_to_do(tmp_path, monkeypatch):
    """The Python name allow_incomplete=True is only a parenthetical for library users."""
    from cxrembed.store import reader

    path = _small_store(tmp_path / "s.h5", complete=False)
    with pytest.raises(StoreError) as refused:
        EmbeddingStore.open(path)
    message = str(refused.value)
    assert "incomplete (10 of 30 rows)" in message and "with --resume" in message
    assert "allow_incomplete=True" in message
    assert "allow_incomplete" not in _outside_parentheses(message)
    monkeypatch.setattr(reader, "writer_at_work", lambda path: {"pid": 7, "host": "h"})
    with pytest.raises(StoreError) as refused:
        EmbeddingStore.open(path)
    message = str(refused.value)
    assert "being written by process 7" in message and "wait for that encode" in message
    assert "allow_incomplete" not in _outside_parentheses(message)
