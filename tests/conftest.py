"""Shared fixtures: a small synthetic NIH twin, the real NIH files when present."""

from __future__ import annotations

import os
from pathlib import Path

# As the `cxrembed` command does (cxrembed/cli/__init__.py), before torch is imported:
# passive OpenMP waits, or torch's threads spin and stall on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

SHARED_NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"


@pytest.fixture(scope="session")
def twin(tmp_path_factory) -> Path:
    """A 240-image synthetic twin at 64 px (read-only: copy before changing it)."""
    from cxrembed.data.synth import make_twin

    return make_twin(tmp_path_factory.mktemp("twin") / "nih", images=240, size=64, seed=0,
                     workers=1)


@pytest.fixture(scope="session")
def shared_nih() -> Path:
    """The real NIH files of ../shared/nih; tests using it skip when it is absent."""
    if not (SHARED_NIH / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip("../shared/nih is absent (a fresh clone has no real NIH files)")
    return SHARED_NIH


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of training tests (restored after): on two
    shared cores, extra threads only add oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
