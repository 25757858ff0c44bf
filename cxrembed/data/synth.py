"""A synthetic twin of NIH ChestX-ray14: same layout, same files, planted findings.

``make_twin(out, images=N, size=S, seed=K)`` writes::

    out/
      images_001/images/<patient:08d>_<follow-up:03d>.png   (8-bit gray; ~1% RGBA, as NIH has)
      Data_Entry_2017.csv      every official column, the official header
      train_val_list.txt       patient-disjoint from test_list.txt, no final newline
      test_list.txt
      synth.json               the parameters and what each class looks like

Patients have several images each (follow-ups share most of their findings), labels
follow NIH prevalence with realistic co-occurrence (effusion with atelectasis and edema,
edema with cardiomegaly, nodule with mass, ...), and every class has a planted visual
signature, so that a linear probe on pixels scores well above chance and learning can be
tested end to end without the real data. Output depends only on the arguments.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS, NIH_PREVALENCE, format_finding_labels

log = logging.getLogger(__name__)

CSV_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NO_FINDING_SHARE = 0.538
TEST_SHARE = 25_596 / 112_120
IMAGES_PER_PATIENT = 112_120 / 30_805

SIGNATURES = {
    "Atelectasis": "a bright horizontal plate-like band low in one lung",
    "Consolidation": "a dense homogeneous bright patch in one lung",
    "Infiltration": "diffuse mottled texture over both lungs",
    "Pneumothorax": "a black, structure-free zone at one lung's edge behind a thin bright line",
    "Edema": "bilateral perihilar haze (a butterfly around the hila)",
    "Emphysema": "larger, darker (hyperinflated) lungs",
    "Fibrosis": "a reticular net of fine lines in the lower zones",
    "Effusion": "a bright lower zone with a meniscus on one or both sides",
    "Pneumonia": "several small patchy bright spots in one lung",
    "Pleural Thickening": "a bright rim along the outer edge of a lung",
    "Cardiomegaly": "an enlarged central heart shadow",
    "Nodule": "two to four small bright dots",
    "Mass": "one large bright round blob",
    "Hernia": "a round bright shadow with an air bubble low behind the heart",
}

# Pairs that travel together in NIH (multiplier on the chance of the second given the first).
_COOCCURRENCE = {
    ("Effusion", "Atelectasis"): 4.0, ("Effusion", "Edema"): 4.0,
    ("Edema", "Cardiomegaly"): 4.0, ("Effusion", "Cardiomegaly"): 3.0,
    ("Infiltration", "Pneumonia"): 4.0, ("Infiltration", "Consolidation"): 3.0,
    ("Nodule", "Mass"): 4.0, ("Emphysema", "Pneumothorax"): 4.0,
    ("Fibrosis", "Pleural Thickening"): 4.0, ("Atelectasis", "Consolidation"): 3.0,
}


def _cooccurrence_matrix() -> np.ndarray:
    boost = np.ones((len(LABELS), len(LABELS)))
    for (a, b), m in _COOCCURRENCE.items():
        i, j = LABELS.index(a), LABELS.index(b)
        boost[i, j] = boost[j, i] = m
    return boost


def sample_labels(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-hot labels at NIH-like prevalence with co-occurrence (N×14 uint8)."""
    prevalence = np.array(NIH_PREVALENCE)
    boost = _cooccurrence_matrix()
    # An abnormal image carries 1.57 labels on average in NIH: 1 + Poisson(0.57).
    labels = np.zeros((n_images, len(LABELS)), dtype=np.uint8)
    abnormal = rng.random(n_images) >= NO_FINDING_SHARE
    for r in np.flatnonzero(abnormal):
        weights = prevalence.copy()
        for _ in range(1 + rng.poisson(0.57)):
            p = weights * (1 - labels[r])
            if p.sum() == 0:
                break
            k = rng.choice(len(LABELS), p=p / p.sum())
            labels[r, k] = 1
            weights = weights * boost[k]
    return labels


def _plan(n_images: int, seed: int, min_positives: int) -> dict[str, np.ndarray]:
    """Patients, follow-ups, labels, views, ages, sexes and the test split."""
    rng = np.random.default_rng(seed)
    counts: list[int] = []
    while sum(counts) < n_images:
        counts.append(int(min(rng.geometric(1 / IMAGES_PER_PATIENT), 40)))
    counts[-1] -= sum(counts) - n_images
    counts = [c for c in counts if c > 0]
    n_patients = len(counts)
    patient = np.repeat(np.arange(1, n_patients + 1), counts)
    follow_up = np.concatenate([np.arange(c) for c in counts])

    # Test patients: shuffled until the test share of images is reached.
    order = rng.permutation(n_patients)
    cum = np.cumsum(np.array(counts)[order])
    n_test_patients = max(1, int(np.searchsorted(cum, TEST_SHARE * n_images)))
    test_patients = set((order[:n_test_patients] + 1).tolist())
    is_test = np.array([p in test_patients for p in patient])

    # Follow-ups share their patient's findings: resample each image's labels mostly
    # from the patient's first image, sometimes afresh.
    base = sample_labels(n_patients, rng)
    fresh = sample_labels(n_images, rng)
    keep = rng.random(n_images) < 0.6
    labels = np.where(keep[:, None], base[patient - 1], fresh)

    # Enough positives of every class in train_val and test for AUC to be defined: at
    # least min_positives and at least 1% (this lifts Hernia from NIH's 0.2%).
    for part in (is_test, ~is_test):
        rows = np.flatnonzero(part)
        floor = max(min_positives, int(np.ceil(0.01 * len(rows))))
        for k in range(len(LABELS)):
            short = floor - int(labels[rows, k].sum())
            if short > 0 and len(rows) >= 4 * min_positives:
                candidates = rows[labels[rows, k] == 0]
                labels[rng.choice(candidates, size=min(short, len(candidates)), replace=False),
                       k] = 1

    sex = np.where(rng.random(n_patients) < 0.56, "M", "F")[patient - 1]
    age0 = np.clip(rng.normal(47, 17, n_patients), 1, 94).astype(int)
    age = age0[patient - 1] + follow_up // 4
    view = np.where(rng.random(n_images) < 0.6, "PA", "AP")
    return {"patient": patient, "follow_up": follow_up, "labels": labels, "sex": sex,
            "age": age, "view": view, "is_test": is_test}


def _blob(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, value: float,
          angle: float = 0.0) -> None:
    import cv2

    s = img.shape[0]
    cv2.ellipse(img, (int(cx * s), int(cy * s)), (max(1, int(rx * s)), max(1, int(ry * s))),
                angle, 0, 360, value, -1, lineType=cv2.LINE_AA)


def render(labels: np.ndarray, size: int, seed: int, view: str = "PA",
           strength: float = 1.0) -> np.ndarray:
    """Draw one synthetic chest X-ray (uint8 size×size) with the findings in ``labels``."""
    import cv2

    rng = np.random.default_rng(seed)
    has = {name: bool(labels[i]) for i, name in enumerate(LABELS)}
    j = lambda scale=0.02: rng.normal(0, scale)  # noqa: E731  anatomy jitter
    body = np.zeros((size, size), np.float32)
    _blob(body, 0.5 + j(), 0.55 + j(), 0.42 + j(), 0.5, 0.38)
    lungs = np.zeros_like(body)
    lung_scale = 1.15 if has["Emphysema"] else 1.0
    lung_y, lung_rx, lung_ry = 0.48 + j(), 0.13 * lung_scale, 0.27 * lung_scale
    sides = (0.31 + j(0.01), 0.69 + j(0.01))
    for cx in sides:
        _blob(lungs, cx, lung_y, lung_rx + j(0.01), lung_ry + j(0.01), 1.0)
    lung_level = 0.07 if has["Emphysema"] else 0.17
    img = np.where(lungs > 0, lung_level, body)
    # Spine and mediastinum.
    cv2.rectangle(img, (int(0.46 * size), 0), (int(0.54 * size), size), 0.55, -1)
    heart = 1.55 if has["Cardiomegaly"] else 1.0
    heart *= 1.08 if view == "AP" else 1.0  # AP magnifies the heart a little
    _blob(img, 0.53 + j(0.01), 0.66 + j(0.01), 0.11 * heart + j(0.01), 0.09 * heart, 0.5)

    add = np.zeros_like(img)
    side = rng.integers(2)
    cx = sides[side]
    g = strength
    if has["Atelectasis"]:
        _blob(add, cx, lung_y + 0.12 + j(), 0.09, 0.018, 0.3 * g, angle=j(8))
    if has["Consolidation"]:
        _blob(add, cx + j(0.03), lung_y + j(0.06), 0.07, 0.08, 0.3 * g)
    if has["Infiltration"]:
        noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 60)
        add += (lungs > 0) * (noise - noise.mean()) * 6.0 * g * 0.15
        add += (lungs > 0) * 0.06 * g
    if has["Pneumothorax"]:
        mask = np.zeros_like(img)
        edge = cx + (0.07 if side else -0.07)
        _blob(mask, edge, lung_y - 0.1, 0.06, 0.14, 1.0)
        img = np.where(mask > 0, 0.0, img)
        cv2.ellipse(add, (int(edge * size), int((lung_y - 0.1) * size)),
                    (int(0.06 * size), int(0.14 * size)), 0, 0, 360, 0.35 * g,
                    max(1, size // 128), lineType=cv2.LINE_AA)
    if has["Edema"]:
        for hx in (0.41, 0.59):
            _blob(add, hx, lung_y + 0.03, 0.09, 0.12, 0.2 * g)
    if has["Fibrosis"]:
        net = np.zeros_like(img)
        width = max(1, size // 200)
        for k in range(8):
            y = int((lung_y + 0.05 + 0.02 * k) * size)
            cv2.line(net, (int(0.2 * size), y), (int(0.8 * size), y), 0.14 * g, width)
        for k in range(10):
            x = int((0.2 + 0.06 * k) * size)
            cv2.line(net, (x, int((lung_y + 0.05) * size)), (x, int((lung_y + 0.22) * size)),
                     0.14 * g, width)
        add += net * (lungs > 0)
    if has["Effusion"]:
        for s in ((side,) if rng.random() < 0.6 else (0, 1)):
            _blob(add, sides[s], lung_y + lung_ry - 0.02, lung_rx + 0.02, 0.1, 0.38 * g)
    if has["Pneumonia"]:
        for _ in range(int(rng.integers(3, 6))):
            _blob(add, cx + j(0.05), lung_y + j(0.08), 0.025, 0.025, 0.25 * g)
    if has["Pleural Thickening"]:
        edge = np.zeros_like(img)
        cv2.ellipse(edge, (int(cx * size), int(lung_y * size)),
                    (int(lung_rx * size), int(lung_ry * size)), 0, 0, 360, 0.35 * g,
                    max(2, size // 64), lineType=cv2.LINE_AA)
        add += edge
    if has["Nodule"]:
        for _ in range(int(rng.integers(2, 5))):
            _blob(add, rng.choice(sides) + j(0.05), lung_y + j(0.1), 0.014, 0.014, 0.4 * g)
    if has["Mass"]:
        _blob(add, cx + j(0.03), lung_y - 0.05 + j(0.05), 0.055, 0.055, 0.38 * g)
    if has["Hernia"]:
        _blob(add, 0.5, 0.78, 0.07, 0.06, 0.35 * g)
        _blob(add, 0.5, 0.75, 0.03, 0.015, -0.5 * g)

    img = img + add
    img = cv2.GaussianBlur(img, (0, 0), max(0.5, size / 256))
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _render_and_write(job: tuple[str, np.ndarray, int, int, str, bool]) -> None:
    import cv2

    path, labels, size, seed, view, rgba = job
    img = render(labels, size, seed, view)
    if rgba:  # NIH ships a few RGBA PNGs; keep decoders honest about them
        img = np.dstack([img, img, img, np.full_like(img, 255)])
    if not cv2.imwrite(path, img):
        raise OSError(f"could not write {path}")


def make_twin(out: str | os.PathLike, images: int = 2000, size: int = 256, seed: int = 0,
              min_positives: int = 3, workers: int | None = None) -> Path:
    """Write a synthetic NIH ChestX-ray14 folder (see the module docstring) and return it.

    Args:
        images: number of images (at least 20).
        size: side of the square PNGs (the release has 1024; 64-256 is plenty here).
        seed: everything drawn depends on it alone.
        min_positives: each class gets at least this many positives (and at least 1%) in
            train_val and in test when there are enough images, so that no AUC is
            undefined by accident; this lifts Hernia above NIH's 0.2%.
        workers: processes drawing images (default: all cores).
    """
    if images < 20:
        raise ConfigError(f"--images {images} is too few for a twin with splits; use 20 or more")
    if size < 32:
        raise ConfigError(f"--size {size} is too small to draw findings; use 32 or more")
    out = Path(out)
    image_dir = out / "images_001" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(images, seed, min_positives)
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(plan["patient"], plan["follow_up"])]
    rng = np.random.default_rng(seed + 1)
    rgba = rng.random(images) < 0.01
    jobs = [(str(image_dir / n), plan["labels"][r], size, seed * 1_000_003 + r,
             str(plan["view"][r]), bool(rgba[r])) for r, n in enumerate(names)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and images >= 200:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_and_write, jobs, chunksize=64))
    else:
        for job in jobs:
            _render_and_write(job)

    with open(out / "Data_Entry_2017.csv", "w", encoding="utf-8", newline="") as f:
        f.write(CSV_HEADER + "\n")
        for r, name in enumerate(names):
            f.write(f"{name},{format_finding_labels(plan['labels'][r])},{plan['follow_up'][r]},"
                    f"{plan['patient'][r]},{plan['age'][r]},{plan['sex'][r]},{plan['view'][r]},"
                    f"{size},{size},0.143,0.143\n")
    test = [n for n, t in zip(names, plan["is_test"]) if t]
    train_val = [n for n, t in zip(names, plan["is_test"]) if not t]
    (out / "test_list.txt").write_text("\n".join(test), encoding="utf-8")
    (out / "train_val_list.txt").write_text("\n".join(train_val), encoding="utf-8")
    (out / "synth.json").write_text(json.dumps({
        "generator": "cxrembed.data.synth.make_twin", "images": images, "size": size,
        "seed": seed, "min_positives": min_positives,
        "patients": int(plan["patient"].max()), "signatures": SIGNATURES,
    }, indent=2), encoding="utf-8")
    log.info("wrote a synthetic NIH twin of %d images to %s", images, out)
    return out
