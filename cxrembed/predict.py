"""``cxrembed predict``: new images (PNG, JPEG, DICOM) in, calibrated calls out.

Research use only: not a medical device; no clinical use.

Inputs are files, folders (recursive) or text files listing paths. The encoder is the one
the head was fitted for (loaded once from its card, refused if its fingerprint differs).
Images are read in fixed batches of the input list and each batch's rows are appended to
the output and flushed, so a rerun skips the images already written; a batch that was
cut off is recomputed whole (the same images together, so the same numbers) and only its
missing rows are written. An image that cannot be read becomes a row with the reason.

Sanity checks run on the first batch and warn once each (:class:`PredictWarning`): pixel
range that looks unnormalised (any image) or inverted (most images: mediastinum darker
than the lungs), a lateral view (DICOM ViewPosition, or an aspect ratio outside
0.7-1.45), and, with a store, images far from the training data (more than 10% of the
batch with a mean similarity to their nearest stored images below the 1st percentile of
val images', recorded in the head's card).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.files import atomic_write_text, disk_full_error, is_disk_full

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic")
LIST_SUFFIXES = (".txt", ".lst", ".list")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
NOTICE = "research use only; not a medical device; no clinical use"


class PredictWarning(UserWarning):
    """Something about the input images that makes the scores doubtful."""


@dataclass
class PredictResult:
    out: Path
    total: int
    written: int  # rows written by this run
    skipped: int  # rows already in the output (resumed)
    errors: int  # images of this run that could not be read
    warnings: list[str] = field(default_factory=list)


def gather_inputs(inputs: list[str | os.PathLike]) -> list[str]:
    """Image paths from files, folders (recursive, sorted) and text files of paths (one a
    line, relative to the list's folder when not found as given)."""
    from cxrembed.data.dicom import is_dicom

    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                if f.suffix.lower() in IMAGE_SUFFIXES or (not f.suffix and is_dicom(f)):
                    paths.append(str(f))
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    paths.append(str(q if q.is_absolute() or q.exists() else p.parent / q))
        elif p.exists() or p.suffix:
            paths.append(str(p))  # a missing file becomes an error row, not a stop
        else:
            raise DataError(f"input {item} does not exist (expected an image, a folder or a "
                            "text file of paths)")
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)} and DICOM files without a suffix)")
    return paths


def _read(path: str, size: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Decode one image; never raises (the reason goes into the row)."""
    from cxrembed.data.images import _resize_crop, read_image

    try:
        gray, view = read_image(path)
    except Exception as exc:  # one bad file never stops the batch
        reason = str(exc) if hasattr(exc, "args") and exc.args else type(exc).__name__
        return None, {"error": reason.replace("\n", " ")}
    h, w = gray.shape
    facts = {"view": view, "aspect": w / h, "mean": float(gray.mean()),
             "spread": float(np.percentile(gray, 99) - np.percentile(gray, 1)),
             "centre_minus_sides": _centre_minus_sides(gray)}
    return _resize_crop(gray, size), facts


def _centre_minus_sides(gray: np.ndarray) -> float:
    """Mean grey of the central vertical strip (mediastinum, spine) minus that of the two
    lateral thirds (lungs): positive on a frontal chest film, negative when inverted."""
    h, w = gray.shape
    band = gray[h // 5: 4 * h // 5]
    centre = band[:, 2 * w // 5: 3 * w // 5].mean()
    sides = np.concatenate([band[:, w // 10: w // 3], band[:, 2 * w // 3: 9 * w // 10]], 1)
    return float(centre - sides.mean())


def sanity_warnings(facts: list[dict[str, Any]], ood: np.ndarray | None = None,
                    ood_floor: float | None = None) -> list[str]:
    """The doubts the first batch raises (each once), as messages."""
    good = [f for f in facts if "error" not in f]
    out = []
    flat = [f for f in good if f["spread"] < 40 or f["mean"] < 15 or f["mean"] > 240]
    if flat:
        out.append(f"{len(flat)} of {len(good)} images of the first batch have a narrow or "
                   "extreme pixel range (unnormalised, or a 12/16-bit image read wrongly?)")
    inverted = [f for f in good if f["centre_minus_sides"] < -10]
    if len(inverted) > len(good) / 2:  # 1 of NIH's 33 sample images alone scores -28
        out.append(f"{len(inverted)} of {len(good)} images of the first batch look inverted "
                   "(mediastinum darker than the lungs): MONOCHROME1 without its tag?")
    lateral = [f for f in good if f["view"] in LATERAL_VIEWS
               or (not f["view"] and not 0.7 <= f["aspect"] <= 1.45)]
    if lateral:
        out.append(f"{len(lateral)} of {len(good)} images of the first batch look lateral "
                   "(DICOM ViewPosition, or their aspect ratio); heads were fitted on "
                   "frontal views")
    if ood is not None and ood_floor is not None:
        far = int((ood < ood_floor).sum())
        if far > 0.1 * len(ood):  # 1% of val images fall below by construction
            out.append(f"{far} of {len(ood)} images of the first batch are far from the "
                       f"training data (mean similarity to their nearest stored images below "
                       f"{ood_floor:.4f}, the val images' 1st percentile)")
    return out


def output_columns(label_names: list[str], with_store: bool) -> list[str]:
    cols = ["path", "status", "error", "view", "positives"]
    for name in label_names:
        cols += [f"{name} probability", f"{name} positive"]
    if with_store:
        cols += ["neighbour ids", "neighbour labels", "neighbour similarities",
                 "mean neighbour similarity"]
    return cols


class _Output:
    """Rows appended and flushed per batch. CSV is appended in place; JSON is kept as JSON
    lines in ``OUT.partial`` and written as one document at the end."""

    def __init__(self, path: Path, columns: list[str], header: dict[str, Any]) -> None:
        if path.suffix.lower() not in (".csv", ".json"):
            raise ConfigError(f"--out {path}: give a .csv or a .json file")
        self.path, self.columns, self.header = path, columns, header
        self.json = path.suffix.lower() == ".json"
        self.work = path.with_name(path.name + ".partial") if self.json else path
        existing = self._existing()
        #: paths already in the output (a rerun skips them)
        self.done_paths: set[str] = {r["path"] for r in existing}
        # Rows are kept for the JSON document only: a CSV's memory stays flat however many
        # images it scores (a row is ~1 KB of Python objects: 100k images, 100+ MB).
        self.done: list[dict[str, Any]] = existing if self.json else []
        self.file = None

    def _existing(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if self.json and self.path.is_file():
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            rows = list(doc.get("predictions", []))
            self._check(list(rows[0]) if rows else self.columns)
            if not self.work.exists():  # continue from the finished document
                self.work.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return [json.loads(x) for x in self.work.read_text().splitlines() if x.strip()]
        if not self.work.is_file():
            return rows
        data = self.work.read_bytes()
        if not data.endswith(b"\n"):  # a row cut off by a kill: drop it, it is redone
            data = data[:data.rfind(b"\n") + 1]
            with open(self.work, "r+b") as f:
                f.truncate(len(data))
        lines = data.decode("utf-8").splitlines()
        if self.json:
            return [json.loads(x) for x in lines if x.strip()]
        if not lines:
            return rows
        reader = csv.DictReader(lines)
        self._check(reader.fieldnames or [])
        return list(reader)

    def _check(self, columns: list[str]) -> None:
        if list(columns) != self.columns:
            raise ConfigError(f"{self.path} holds predictions with other columns (another "
                              "head, or with/without --store); write to another --out")

    def append(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._append(rows)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._abandon()
            # A row cut off here is dropped by the rerun (see _existing), and redone.
            raise disk_full_error(self.work, exc, f"the {len(self.done_paths)} rows written "
                                  "before are kept") from exc
        self.done_paths.update(r["path"] for r in rows)
        if self.json:
            self.done.extend(rows)

    def _abandon(self) -> None:
        """Close the file after a failed write (its close would retry the write)."""
        try:
            self.file.close()
        except OSError:
            pass

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            fresh = not self.work.exists() or self.work.stat().st_size == 0
            self.file = open(self.work, "a", encoding="utf-8", newline="")
            if fresh and not self.json:
                csv.writer(self.file, lineterminator="\n").writerow(self.columns)
        if self.json:
            self.file.write("".join(json.dumps(r) + "\n" for r in rows))
        else:
            writer = csv.writer(self.file, lineterminator="\n")
            writer.writerows([[r[c] for c in self.columns] for r in rows])
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.json:
            atomic_write_text(self.path, json.dumps({**self.header, "predictions": self.done},
                                                    indent=1))
            self.work.unlink(missing_ok=True)


def _format_rows(paths: list[str], facts: list[dict], prediction: Any, names: list[str],
                 neighbours: tuple | None, as_json: bool) -> list[dict[str, Any]]:
    rows, j = [], 0
    for path, fact in zip(paths, facts):
        row: dict[str, Any] = {"path": path, "status": "error" if "error" in fact else "ok",
                               "error": fact.get("error", ""), "view": fact.get("view", "")}
        if "error" in fact:
            row["positives"] = ""
            for name in names:
                row[f"{name} probability"] = None if as_json else ""
                row[f"{name} positive"] = None if as_json else ""
            if neighbours is not None:
                row.update({"neighbour ids": "", "neighbour labels": "",
                            "neighbour similarities": "", "mean neighbour similarity": ""})
            rows.append(row)
            continue
        prob, pos = prediction.probability[j], prediction.positive[j]
        row["positives"] = "|".join(n for n, p in zip(names, pos) if p)
        for name, p, d in zip(names, prob, pos):
            value = None if np.isnan(p) else round(float(p), 6)
            row[f"{name} probability"] = value if as_json else ("" if value is None
                                                               else f"{value:.6f}")
            row[f"{name} positive"] = bool(d) if as_json else str(int(d))
        if neighbours is not None:
            ids, labels, sims = neighbours
            row["neighbour ids"] = ";".join(ids[j])
            row["neighbour labels"] = ";".join(labels[j])
            row["neighbour similarities"] = ";".join(f"{s:.6f}" for s in sims[j])
            row["mean neighbour similarity"] = f"{float(np.mean(sims[j])):.6f}"
        rows.append(row)
        j += 1
    return rows


def _neighbours(store: Any, unit: np.ndarray, k: int) -> tuple[list, list, np.ndarray]:
    from cxrembed.search import search_vectors

    sims, rows = search_vectors(store, unit.astype(np.float32), k)
    names = store.label_names
    ids = [[str(store.image_id[r]) for r in rr if r >= 0] for rr in rows]
    labels = [["|".join(names[c] for c in np.flatnonzero(store.labels[r])) or "No Finding"
               for r in rr if r >= 0] for rr in rows]
    return ids, labels, sims


def _score_batch(pixels: list[np.ndarray], encoder: Any, saved: Any, store: Any, k: int
                 ) -> tuple[Any, tuple | None]:
    """The head's prediction for decoded images, and their stored neighbours."""
    import torch

    from cxrembed.data.transforms import to_clip_tensor

    if not pixels:
        return None, None
    with torch.inference_mode():
        raw = encoder.encode_image(to_clip_tensor(np.stack(pixels))).float().cpu().numpy()
    neighbours = None
    if store is not None:
        unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        neighbours = _neighbours(store, unit, k)
    return saved.predict(raw), neighbours


def predict_images(inputs: list[str | os.PathLike], head: str | os.PathLike,
                   out: str | os.PathLike, *, store: str | os.PathLike | None = None,
                   k: int = 5, batch_size: int = 32, workers: int = 2, device: str = "auto",
                   encoder: Any = None, progress: bool = False) -> PredictResult:
    """Score images with a saved head (see the module doc); rows go to ``out`` (.csv or
    .json) as they are computed, and a rerun continues where the last one stopped."""
    from cxrembed.data.images import IMAGE_SIZE
    from cxrembed.heads.saved import load_head
    from cxrembed.progress import progress_bar

    if batch_size < 1 or k < 1:
        raise ConfigError(f"batch size {batch_size} and -k {k} must be positive")
    saved = load_head(head)
    paths = gather_inputs(inputs)
    opened = None
    if store is not None:
        from cxrembed.store import EmbeddingStore, check_same_encoder

        opened = EmbeddingStore.open(store)
        check_same_encoder(saved.fingerprint, opened, what=("the head's encoder",
                                                            f"store {opened.path}"))
    names = saved.label_names
    output = _Output(Path(out), output_columns(names, opened is not None),
                     {"notice": NOTICE, "head": str(head), "kind": saved.kind})
    done = set(output.done_paths)
    todo = [p for p in paths if p not in done]
    result = PredictResult(Path(out), len(paths), 0, len(paths) - len(todo), 0)
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    batches = [b for b in batches if any(p not in done for p in b)]
    try:
        if batches:
            encoder = saved.load_encoder(device, encoder)
        with ThreadPoolExecutor(max(workers, 1)) as pool, \
                progress_bar(len(todo), "predict", enabled=progress) as advance:
            for number, batch in enumerate(batches):
                read = list(pool.map(lambda p: _read(p, IMAGE_SIZE), batch))
                facts = [f for _, f in read]
                prediction, neighbours = _score_batch([px for px, _ in read if px is not None],
                                                      encoder, saved, opened, k)
                if number == 0:
                    ood = neighbours[2].mean(axis=1) if neighbours is not None else None
                    floor = saved.card.get("ood", {}).get("val_p01")
                    for message in sanity_warnings(facts, ood, floor):
                        result.warnings.append(message)
                        warnings.warn(message, PredictWarning, stacklevel=2)
                rows = _format_rows(batch, facts, prediction, names, neighbours, output.json)
                new = [r for r in rows if r["path"] not in done]
                output.append(new)
                result.written += len(new)
                result.errors += sum(r["status"] == "error" for r in new)
                advance(len(new))
        output.finish()
    finally:
        if output.file is not None and not output.file.closed:
            output.file.close()
        if opened is not None:
            opened.close()
    return result
