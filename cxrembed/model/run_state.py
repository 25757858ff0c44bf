"""The run folder of an adaptation run and its resume state.

Resume state: safetensors for tensors, JSON for the rest.

``RUN/state/progress.json`` is the commit point. Tensor files carry the epoch in their
name (``trainable-003.safetensors``), and progress.json names the ones it belongs to, so a
kill at any moment leaves either the previous epoch's complete state or the new one,
never a mix. Files no longer named are removed after each commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrembed.data.splits import SPLITS
from cxrembed.errors import ConfigError
from cxrembed.files import atomic_write, atomic_write_text, disk_full_error, is_disk_full

PROGRESS_FILE = "progress.json"


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically, readable like every other file of the run.

    safetensors creates its files 0600 (owner only); a run folder copied to a shared
    disk for others to ``encode`` with must not have one unreadable file in it.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.chmod(tmp, _file_mode())

    atomic_write(path, write)



def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"resume state {path} is missing; the run folder was changed by hand. "
                          "Start over with --overwrite")
    return load_file(str(path), device="cpu")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {PROGRESS_FILE}")


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (``"<param>.<key>"``) and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    keys = {str(index): list(entry) for index, entry in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "keys": keys}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state = {}
    for index, keys in meta["keys"].items():
        entry = {}
        for key in keys:
            entry[key] = tensors[f"{index}.{key}"] if f"{index}.{key}" in tensors else \
                meta["scalars"][index][key]
        state[int(index)] = entry
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class RunState:
    """Where a run stands: epochs done, best val epoch and its weights, early stopping."""

    epochs_done: int = 0
    best_epoch: int = 0
    best_value: float = -math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    complete: bool = False
    history: list[dict] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None
    files: dict[str, str] = field(default_factory=dict)
    _best_changed: bool = False

    @classmethod
    def fresh(cls) -> "RunState":
        return cls()

    def end_epoch(self, model: Any, optimizer: Any, scheduler: Any, record: dict,
                  patience: int) -> None:
        """Book an epoch's val result; snapshot the weights when it is the best so far."""
        self.history.append(record)
        self.epochs_done = record["epoch"]
        value = record["val_mean_auc"]
        if value > self.best_value:  # NaN never improves
            self.best_value, self.best_epoch, self.bad_epochs = value, record["epoch"], 0
            # A real copy: the tensors go on changing in place as training continues.
            self.best_weights = model.trainable_state_dict()
            self._best_changed = True
        else:
            self.bad_epochs += 1
            self.stopped_early = self.bad_epochs >= patience

    def save(self, state_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> None:
        """Write this epoch's tensors, then commit progress.json, then drop stale files."""
        state_dir.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {}
        if model is not None:
            tag = f"{self.epochs_done:03d}"
            self.files["trainable"] = f"trainable-{tag}.safetensors"
            save_tensors(state_dir / self.files["trainable"], model.trainable_state_dict())
            tensors, meta = optimizer_to_files(optimizer)
            self.files["optimizer"] = f"optimizer-{tag}.safetensors"
            save_tensors(state_dir / self.files["optimizer"], tensors)
            if self._best_changed and self.best_weights is not None:
                self.files["best"] = f"best-{self.best_epoch:03d}.safetensors"
                save_tensors(state_dir / self.files["best"], self.best_weights)
                self._best_changed = False
            meta = {"optimizer": meta, "scheduler": scheduler.state_dict()}
        else:
            old = json.loads((state_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
            meta = {"optimizer": old.get("optimizer"), "scheduler": old.get("scheduler")}
        progress = {
            "epochs_done": self.epochs_done, "best_epoch": self.best_epoch,
            "best_value": self.best_value if math.isfinite(self.best_value) else None,
            "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
            "complete": self.complete, "files": self.files, "history": self.history, **meta,
        }
        atomic_write_text(state_dir / PROGRESS_FILE,
                          json.dumps(progress, indent=1, default=_jsonable))
        keep = set(self.files.values()) | {PROGRESS_FILE}
        for path in state_dir.iterdir():
            if path.name not in keep:
                path.unlink()

    @classmethod
    def load(cls, state_dir: Path, progress: dict, model: Any, optimizer: Any,
             scheduler: Any) -> "RunState":
        """Restore a run at its last committed epoch into ``model``/``optimizer``/``scheduler``."""
        state = cls(epochs_done=progress["epochs_done"], best_epoch=progress["best_epoch"],
                    best_value=-math.inf if progress["best_value"] is None
                    else progress["best_value"], bad_epochs=progress["bad_epochs"],
                    stopped_early=progress["stopped_early"], complete=progress["complete"],
                    history=progress["history"], files=dict(progress["files"]))
        if state.epochs_done:
            model.load_trainable_state_dict(_load_tensors(state_dir / state.files["trainable"]))
            optimizer_from_files(optimizer, _load_tensors(state_dir / state.files["optimizer"]),
                                 progress["optimizer"])
            scheduler.load_state_dict(progress["scheduler"])
            state.best_weights = _load_tensors(state_dir / state.files["best"])
        return state


# ---------------------------------------------------------------------------------------
# The run folder


def data_identity(dataset: Any) -> dict[str, Any]:
    """What makes two datasets the same for a run: rows, splits and labels (not paths).

    The known-label mask and the label names count only where they differ from NIH's (some
    label unknown, another label set), so an NIH identity is what it always was."""
    from cxrembed.labels import LABELS

    digest = hashlib.sha256()
    for arr in (dataset.image_id.astype(str), dataset.split.astype(str)):
        digest.update("\n".join(arr.tolist()).encode())
    digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    known = getattr(dataset, "label_known", None)
    if known is not None and not np.all(known):  # e.g. --uncertain ignore against zeros
        digest.update(np.packbits(np.asarray(known, dtype=bool)).tobytes())
    names = list(getattr(dataset, "label_names", None) or LABELS)
    if names != list(LABELS):
        digest.update("\n".join(names).encode())
    counts = {s: int((dataset.split == s).sum()) for s in SPLITS}
    return {"images": int(len(dataset)), "splits": counts, "sha256": digest.hexdigest()}


def config_diff(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now" for k in keys
            if k not in ignore and saved.get(k) != current.get(k)]


OWNED = ("config.json", "metrics.jsonl", "state", "model.safetensors", "model.json",
         "summary.json")


def check_run_dir(out: Path, identity: dict, resume: bool, overwrite: bool,
                  resumable: tuple[str, ...] = ()) -> dict | None:
    """Check, without writing anything, that a run may start or resume in ``out``; return
    the saved identity of a run to resume (None when starting afresh).

    ``identity`` is ``{"config": ..., "data": ...}`` (plus anything to record); a folder
    holding another identity is refused unless ``overwrite``; ``resumable`` config fields
    may differ when resuming (the caller records the new values).
    """
    config_path = out / "config.json"
    if config_path.is_file():
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if overwrite:
                return None
            raise ConfigError(f"cannot read {config_path} ({exc}); pass --overwrite to start "
                              "the run over") from None
        if overwrite:
            return None
        diff = config_diff(saved.get("config", {}), identity["config"], resumable)
        if saved.get("data") != identity["data"]:
            diff.append(f"data: {saved.get('data')} in the run, {identity['data']} now")
        if diff:
            raise ConfigError(f"{out} holds a different run ({'; '.join(diff[:4])}); choose "
                              "another --out, or pass --overwrite to replace it")
        if not resume:
            changed = config_diff(saved.get("config", {}), identity["config"])
            raise ConfigError(f"{out} already holds this run"
                              f"{' (' + '; '.join(changed) + ')' if changed else ''}; pass "
                              "--resume to continue it (or show its result if finished) or "
                              "--overwrite to start over")
        return saved
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    # A run killed before its config.json was written left nothing of itself (at most an
    # empty state/): --resume starts it, as encode --resume starts a store that is not there.
    if out.exists() and _holds_files(out) and not overwrite:
        raise ConfigError(f"{out} is not empty and holds no cxrembed run; choose a new or empty "
                          "--out folder (or pass --overwrite to write into it anyway)")
    return None


def _holds_files(out: Path) -> bool:
    """Whether ``out`` holds anything but empty folders (what a killed start leaves)."""
    return any(not path.is_dir() or _holds_files(path) for path in out.iterdir())


def start_run_dir(out: Path, identity: dict, overwrite: bool) -> None:
    """Create the run folder of a fresh run (replacing a run there when ``overwrite``)
    and write its ``config.json``: the first write of a run."""
    if overwrite and out.is_dir():
        remove_run(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(identity, indent=2))
    (out / "state").mkdir(exist_ok=True)


def remove_run(out: Path) -> None:
    for name in OWNED:  # only what a run writes: --out may be a folder with other files
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # The resumed run writes this epoch's line again (rewrite_metrics).
        raise disk_full_error(path, exc, "the epochs committed before are kept") from exc


def rewrite_metrics(path: Path, history: list[dict]) -> None:
    """Make ``metrics.jsonl`` the committed epochs' records (progress.json's ``history``,
    the very dicts the lines were written from): a line past the last commit, or one cut
    off by a kill or a full disk, is dropped; one that a kill (or full disk) kept from
    being appended just after its epoch's commit is written back."""
    if not path.is_file() and not history:
        return
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def read_progress(state_dir: Path) -> dict | None:
    path = state_dir / "progress.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def check_run_data(run_dir: str | os.PathLike, dataset: Any) -> None:
    """Refuse to use an adapted run on data split differently from the data it trained on.

    A store made with other split options (``--split-seed``, ``--val-fraction``, lists,
    ``--view``) would put images the encoder trained on into its val or test rows, and
    every later selection or test figure would be inflated without a sign.
    """
    from cxrembed.errors import ConfigError

    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("data")
    except (OSError, json.JSONDecodeError):
        saved = None
    if not saved:
        raise ConfigError(f"{path} is missing or records no data identity; cannot check that "
                          "this data is split as the run's was")
    current = data_identity(dataset)
    if saved["sha256"] != current["sha256"]:
        raise ConfigError(
            f"the adapted run {run_dir} was trained on other data or other splits (run: "
            f"{saved['images']} images, splits {saved['splits']}; now: {current['images']} "
            f"images, splits {current['splits']}). Pass the same data options as `cxrembed "
            "adapt` (--split-seed, --val-fraction, --view, lists), or --allow-other-data if "
            "these images are meant to be new to the run (its val/test could then hold "
            "images it trained on)")
