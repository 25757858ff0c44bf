"""Comparisons of a resumed command's result with an uninterrupted run's (benchmarks/faults.py).

Each returns a list of differences ``"key: what"``; empty means identical. ``excluded``
names keys left out (store attributes ``/@created``, adapt fields ``train_seconds``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def compare_bytes(reference: Path, candidate: Path, excluded: list[str]) -> list[str]:
    """Byte for byte (no exclusion is possible)."""
    if not candidate.is_file():
        return [f"{candidate.name}: missing"]
    if reference.read_bytes() != candidate.read_bytes():
        return [f"{candidate.name}: bytes differ ({reference.stat().st_size} vs "
                f"{candidate.stat().st_size} bytes)"]
    return []


def _attrs(prefix: str, ref, cand, excluded: list[str]) -> list[str]:
    diffs = []
    for key in sorted(set(ref.attrs) | set(cand.attrs)):
        name = f"{prefix}@{key}"
        if name in excluded:
            continue
        if key not in ref.attrs or key not in cand.attrs:
            diffs.append(f"{name}: present in one file only")
        elif not np.array_equal(np.asarray(ref.attrs[key]), np.asarray(cand.attrs[key])):
            diffs.append(f"{name}: {ref.attrs[key]!r} vs {cand.attrs[key]!r}")
    return diffs


def compare_store(reference: Path, candidate: Path, excluded: list[str]) -> list[str]:
    """Every dataset's dtype, shape and values (NaN equal to NaN), every attribute of the
    file, its groups and datasets; and the FAISS index beside it byte for byte."""
    import h5py

    if not candidate.is_file():
        return [f"{candidate.name}: missing"]
    diffs: list[str] = []
    with h5py.File(reference, "r") as ref, h5py.File(candidate, "r") as cand:
        names: dict[str, set] = {"ref": set(), "cand": set()}
        ref.visit(names["ref"].add)
        cand.visit(names["cand"].add)
        for name in sorted(names["ref"] ^ names["cand"]):
            diffs.append(f"/{name}: present in one store only")
        diffs += _attrs("/", ref, cand, excluded)
        for name in sorted(names["ref"] & names["cand"]):
            a, b = ref[name], cand[name]
            diffs += _attrs(f"/{name}", a, b, excluded)
            if not isinstance(a, h5py.Dataset):
                continue
            if a.dtype != b.dtype or a.shape != b.shape:
                diffs.append(f"/{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
            elif not np.array_equal(a[()], b[()], equal_nan=a.dtype.kind == "f"):
                diffs.append(f"/{name}: values differ")
    index = reference.with_suffix(".faiss")
    if index.exists():
        diffs += compare_bytes(index, candidate.with_suffix(".faiss"), [])
    return diffs


def _metrics(path: Path, excluded: list[str]) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [{k: v for k, v in line.items() if k not in excluded} for line in lines]


def compare_adapt(reference: Path, candidate: Path, excluded: list[str]) -> list[str]:
    """metrics.jsonl line by line and summary.json key by key (timing fields excluded),
    model.safetensors byte for byte."""
    diffs = []
    for name in ("metrics.jsonl", "summary.json", "model.safetensors", "model.json"):
        if not (candidate / name).is_file():
            diffs.append(f"{name}: missing")
    if diffs:
        return diffs
    ref, cand = _metrics(reference / "metrics.jsonl", excluded), \
        _metrics(candidate / "metrics.jsonl", excluded)
    if len(ref) != len(cand):
        diffs.append(f"metrics.jsonl: {len(ref)} vs {len(cand)} lines")
    for number, (a, b) in enumerate(zip(ref, cand), 1):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: metrics.jsonl line {number}: {a.get(key)} vs {b.get(key)}")
    summary = [_drop(json.loads((d / "summary.json").read_text()), excluded)
               for d in (reference, candidate)]
    for key in sorted(set(summary[0]) | set(summary[1])):
        if summary[0].get(key) != summary[1].get(key):
            diffs.append(f"{key}: summary.json differs")
    diffs += compare_bytes(reference / "model.safetensors", candidate / "model.safetensors", [])
    return diffs


def _drop(value, excluded: list[str]):
    """``value`` without the excluded keys, at any depth (history lines hold timings)."""
    if isinstance(value, dict):
        return {k: _drop(v, excluded) for k, v in value.items() if k not in excluded}
    if isinstance(value, list):
        return [_drop(v, excluded) for v in value]
    return value


def compare_head(reference: Path, candidate: Path, excluded: list[str]) -> list[str]:
    """head.npz byte for byte, head.json key for key."""
    diffs = compare_bytes(reference / "head.npz", candidate / "head.npz", [])
    if not (candidate / "head.json").is_file():
        return diffs + ["head.json: missing"]
    cards = [_drop(json.loads((d / "head.json").read_text()), excluded)
             for d in (reference, candidate)]
    for key in sorted(set(cards[0]) | set(cards[1])):
        if cards[0].get(key) != cards[1].get(key):
            diffs.append(f"{key}: head.json differs")
    return diffs
