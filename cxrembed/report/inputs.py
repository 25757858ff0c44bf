"""What a report is made of: the results found in the paths given (files, or folders scanned).

Recognised, by content (not by name, except the folder layouts below):

* few-shot results: a ``cxrembed fewshot --out`` folder or its ``fewshot.json``;
* ``cxrembed zeroshot/evaluate --out`` JSON (format ``cxrembed.eval``);
* adaptation runs: a ``cxrembed adapt --out`` folder (``metrics.jsonl``, ``config.json``,
  ``summary.json`` once finished);
* embedding stores: ``.h5`` files with ``format = cxrembed.store``;
* a ``cxrembed demo`` folder's ``summary.json`` (steps, dataset, searches) and its
  ``thumbnails.json``.

A file that cannot be read or parsed is an error naming it; a file given by name that is
none of these is an error; in a scanned folder it is listed as ignored, with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cxrembed.errors import DataError

RESULT_FORMATS = ("cxrembed.fewshot", "cxrembed.eval")
DEMO_FORMAT = "cxrembed.demo"
#: Files a run, few-shot or demo folder holds beside what is read: not reported as ignored.
_COMPANIONS = {"config.json", "model.json", "summary.json", "thumbnails.json", "roc.json",
               "fewshot_curves.json", "progress.json", "comparison.json", "synth.json"}


@dataclass
class Run:
    """An adaptation run folder: its config, per-epoch metrics and final summary."""

    path: Path
    history: list[dict[str, Any]]
    config: dict[str, Any] | None
    summary: dict[str, Any] | None


@dataclass
class Inputs:
    """Everything found, in the order found, and what was passed over (and why)."""

    results: list[dict[str, Any]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    stores: list[Path] = field(default_factory=list)
    demo: dict[str, Any] | None = None
    demo_dir: Path | None = None
    thumbnails: dict[str, str] = field(default_factory=dict)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    _seen: set[Path] = field(default_factory=set)

    def found(self) -> list[tuple[str, str]]:
        """(kind, what) for each input used: the page and the terminal list these."""
        rows = []
        if self.demo is not None:
            rows.append(("demo summary", str(self.demo_dir / "summary.json")))
        for obj in self.results:
            kind = ("few-shot result" if obj["format"] == "cxrembed.fewshot"
                    else f"{obj.get('protocol', 'evaluation')} result")
            rows.append((kind, obj["_path"]))
        rows += [("adaptation run", str(run.path)) for run in self.runs]
        rows += [("embedding store", str(path)) for path in self.stores]
        return rows


def read_json(path: Path) -> Any:
    """A JSON file's content; DataError naming the file when it is unreadable or corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}): the report cannot use it; "
                        "rerun the step that wrote it, or move it out of the way") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; DataError naming the file and line when one is corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}, is not valid JSON ({exc})") from None
    return rows


def find_inputs(paths: Sequence[str | os.PathLike]) -> Inputs:
    """Classify each path (a folder is scanned, depth first) into :class:`Inputs`."""
    if not paths:
        raise DataError("nothing to report: pass result files or folders (a few-shot "
                        "folder, zeroshot/evaluate JSON, an adapt run, a store, a demo folder)")
    inputs = Inputs()
    for given in map(Path, paths):
        if given.is_dir():
            _scan(given, inputs)
        elif given.is_file():
            _add_file(given, inputs, explicit=True)
        else:
            raise DataError(f"{given} does not exist; pass result files or folders")
    return inputs


def _scan(root: Path, inputs: Inputs) -> None:
    for folder, subdirs, files in os.walk(root):
        here = Path(folder)
        subdirs.sort()
        if "metrics.jsonl" in files:  # an adaptation run: its state/ is internal
            _add_run(here, inputs)
            subdirs.clear()
            continue
        for name in sorted(files):
            path = here / name
            if name == "summary.json" and _is_demo_summary(path):
                _add_demo(path, inputs)
            elif name in _COMPANIONS or name.endswith((".faiss.json", ".skipped.json")):
                continue  # a store's index and skipped-rows sidecars
            elif name.endswith((".json", ".h5")):
                _add_file(path, inputs, explicit=False)


def _is_demo_summary(path: Path) -> bool:
    obj = read_json(path)
    return isinstance(obj, dict) and (obj.get("format") == DEMO_FORMAT or "steps" in obj)


def _add_file(path: Path, inputs: Inputs, explicit: bool) -> None:
    if path.resolve() in inputs._seen:
        return
    if path.name == "metrics.jsonl":
        return _add_run(path.parent, inputs)
    if path.suffix == ".h5":
        return _add_h5(path, inputs, explicit)
    if path.suffix != ".json":
        if explicit:
            raise DataError(f"{path}: cxrembed report reads JSON results, .h5 stores and "
                            "folders; this file is none of them")
        return
    obj = read_json(path)
    kind = obj.get("format") if isinstance(obj, dict) else None
    if kind in RESULT_FORMATS:
        obj["_path"] = str(path)
        inputs.results.append(obj)
        inputs._seen.add(path.resolve())
    elif path.name == "summary.json" and _is_demo_summary(path):
        _add_demo(path, inputs)
    elif explicit:
        raise DataError(f"{path} is not a result cxrembed report can show (format {kind!r}); "
                        f"expected {' or '.join(RESULT_FORMATS)}, a demo summary.json, a "
                        "store or a folder")
    else:
        inputs.ignored.append((path, f"not a cxrembed result (format {kind!r})"))


def _add_h5(path: Path, inputs: Inputs, explicit: bool) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("format")
    except OSError as exc:
        raise DataError(f"cannot open {path} as HDF5: {exc}") from None
    if kind == "cxrembed.store":
        inputs.stores.append(path)
        inputs._seen.add(path.resolve())
    elif explicit:
        raise DataError(f"{path} is an HDF5 file but not a cxrembed store (a pixel cache "
                        "has nothing to report); pass a store written by `cxrembed encode`")
    else:
        inputs.ignored.append((path, "HDF5 file that is not an embedding store (a pixel "
                                     "cache?)"))


def _add_run(folder: Path, inputs: Inputs) -> None:
    if folder.resolve() in inputs._seen:
        return
    inputs._seen.add(folder.resolve())
    history = [h for h in read_jsonl(folder / "metrics.jsonl") if "epoch" in h]
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() \
        else None
    inputs.runs.append(Run(folder, history, config, summary))


def _add_demo(path: Path, inputs: Inputs) -> None:
    if inputs.demo is not None or path.resolve() in inputs._seen:
        return
    inputs._seen.add(path.resolve())
    inputs.demo, inputs.demo_dir = read_json(path), path.parent
    thumbs = inputs.demo.get("thumbnails")
    if thumbs and (path.parent / thumbs).is_file():
        inputs.thumbnails = read_json(path.parent / thumbs)
