"""The files of an index beside its store: ``STORE.faiss`` and its ``STORE.faiss.json``
sidecar (:class:`IndexInfo`), written beside their final place and moved there together
(:class:`PreparedIndex`); FAISS itself, imported where it is used."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxrembed.errors import StoreError
from cxrembed.files import disk_full_error, is_disk_full

log = logging.getLogger(__name__)


@dataclass
class IndexInfo:
    """What the sidecar records about an index."""

    kind: str
    ntotal: int
    dim: int
    store_uuid: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # nlist, nprobe, M, efSearch ...
    centred: bool = False  # holds centred vectors (store mean subtracted, re-normalised)
    centre: str = "off"  # the --centre asked when it was built (auto | on | off)
    bytes_per_vector: float = 0.0  # index memory per vector (codes + ids); 0: not recorded


def index_path(store_path: str | os.PathLike) -> Path:
    """``STORE.h5`` -> ``STORE.faiss``."""
    return Path(store_path).with_suffix(".faiss")


def has_index(store_path: str | os.PathLike) -> bool:
    """An index file (or its sidecar) lies beside the store: searches must use it, or say
    why they cannot (a broken index is an error, never silently skipped)."""
    path = index_path(store_path)
    return path.exists() or info_path(path).exists()


def info_path(path: Path) -> Path:
    """``X.faiss`` -> ``X.faiss.json`` (the sidecar)."""
    return path.with_name(path.name + ".json")


def load_faiss():
    """The faiss module, or a StoreError that says how to install it."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - a declared dependency
        raise StoreError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12)"
                         ) from None
    return faiss


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    faiss = load_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except RuntimeError as exc:  # a broken CUDA setup means no GPU, not a crash
        log.warning("faiss-gpu is installed but cannot count GPUs (%s): building on the CPU",
                    exc)
        return False


def write_tmp(faiss: Any, index: Any, info: IndexInfo, out: Path) -> Path:
    """Write the index and its sidecar beside ``out`` (``.tmp``); a full disk is a
    DiskFullError naming ``out``, and nothing half-written is left."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        faiss.write_index(index, str(tmp))
        info_path(tmp).write_text(json.dumps(asdict(info), indent=2))
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        info_path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(out, exc, "the store itself is complete; `cxrembed index "
                                  "STORE` builds its index") from exc
        raise StoreError(f"cannot write index {out}: {exc}") from exc
    return tmp


@dataclass
class PreparedIndex:
    """An index written beside its final place, moved there by :meth:`commit`."""

    tmp: Path

    def commit(self, out: Path) -> None:
        # The sidecar first: an index file never sits beside a stale sidecar.
        os.replace(info_path(self.tmp), info_path(out))
        os.replace(self.tmp, out)
