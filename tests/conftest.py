"""Shared fixtures: a small synthetic NIH twin, the real NIH files when present."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

# As the `cxrembed` command does (cxrembed/cli/__init__.py), before torch is imported:
# passive OpenMP waits, or torch's threads spin and stall on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n 2`, the README's test command) each worker is one of two busy
# processes on two cores: one thread each for BLAS, OpenMP and torch, in the worker and in
# the commands its tests start (they inherit the environment). More threads only wait on
# the other worker: OpenBLAS's idle threads spin, and 14 sklearn probes of
# test_synth.py took 18.4 s of CPU with 2 threads vs 0.9 s with 1 (same AUCs) on a loaded
# machine. Set before numpy, torch or faiss is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")

import pytest  # noqa: E402

SHARED_NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"


@pytest.fixture(scope="session")
def twin(tmp_path_factory) -> Path:
    """A 240-image synthetic twin at 64 px (read-only: copy before changing it)."""
    from cxrembed.data.synth import make_twin

    return make_twin(tmp_path_factory.mktemp("twin") / "nih", images=240, size=64, seed=0,
                     workers=1)


@pytest.fixture(scope="session")
def tiny_store(twin, tmp_path_factory) -> SimpleNamespace:
    """The twin (val 25%), the random-init tiny CLIP and the store it encodes of it, made
    once per session (read-only: fit heads and write outputs elsewhere)."""
    from cxrembed.data import load_nih
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    dataset = load_nih(twin, val_fraction=0.25)
    encoder = load_encoder(model="cxr-tiny", pretrained="none")
    store = tmp_path_factory.mktemp("tiny-store") / "tiny.h5"
    encode_dataset(dataset, store, encoder, batch_size=32, progress=False, workers=0)
    return SimpleNamespace(dataset=dataset, encoder=encoder, store=store)


@pytest.fixture(scope="session")
def shared_nih() -> Path:
    """The real NIH files of ../shared/nih; tests using it skip when it is absent."""
    if not (SHARED_NIH / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip("../shared/nih is absent (a fresh clone has no real NIH files)")
    return SHARED_NIH


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("run_all")``: the module benchmarks/run_all.py, loaded from its
    file (the benchmarks are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of training tests (restored after): on two
    shared cores, extra threads only add oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    # With `-n 2 --dist loadfile` xdist hands out whole files, by default those with the
    # most tests first; the order of pytest_collection_modifyitems below balances the two
    # workers better, so xdist keeps it.
    if getattr(config.option, "numprocesses", None) and hasattr(config.option,
                                                                "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the files with the most slow tests first (each file's tests in
    their own order): a long file started last would keep one worker busy while the other
    waits at the end."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from collections import Counter

    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first: dict = {}
    for position, item in enumerate(items):
        first.setdefault(item.path, position)
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))
