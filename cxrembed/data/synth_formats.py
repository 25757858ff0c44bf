"""Synthetic twins of CheXpert, MIMIC-CXR-JPG, PadChest, a labelled CSV and class folders.

``make_format_twin(out, "chexpert", images=N, size=S, seed=K)`` writes files in the real
layouts (see each reader's docstring and the README), drawn with the NIH twin's planted
findings (:func:`cxrembed.data.synth.render`), so the readers are tested on real-shaped
files and learning stays checkable. A finding of the target vocabulary that means the same
as an NIH class carries that class's signature; the rest (CheXpert's Fracture, Support
Devices, ...) are drawn at random and carry no signal. Output depends only on the
arguments.

===========  ===============================================================================
format       what is written under ``out``
===========  ===============================================================================
chexpert     train.csv, valid.csv (1.0 / 0.0 / -1.0 / blank), train|valid/patientNNNNN/studyK/viewJ_frontal|lateral.jpg
mimic        mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz, files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg
padchest     PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv, 16-bit PNGs (12 bits stored) in 0/, 1/, ...
csv          labels.csv (image, patient_id, split, view, age, sex, findings "A|B", one 1/0/-1/blank column per class), scans/ of mixed PNG 8/16-bit, RGB(A), JPEG, upper-case suffixes
folders      train|val|test/<class>/*.png, one class per image
===========  ===============================================================================
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cxrembed.data.synth import _plan, render
from cxrembed.errors import ConfigError
from cxrembed.labels import LABELS

log = logging.getLogger(__name__)

FORMATS = ("nih", "chexpert", "mimic", "padchest", "csv", "folders")
#: NIH class -> the same finding in CheXpert's and PadChest's words (the twins draw it).
CHEXPERT_OF = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
               "Consolidation": "Consolidation", "Edema": "Edema", "Effusion": "Pleural Effusion",
               "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax"}
PADCHEST_OF = {"Atelectasis": "atelectasis", "Consolidation": "consolidation",
               "Infiltration": "infiltrates", "Pneumothorax": "pneumothorax",
               "Edema": "pulmonary edema", "Emphysema": "emphysema",
               "Fibrosis": "pulmonary fibrosis", "Effusion": "pleural effusion",
               "Pneumonia": "pneumonia", "Pleural Thickening": "pleural thickening",
               "Cardiomegaly": "cardiomegaly", "Nodule": "nodule", "Mass": "mass",
               "Hernia": "hiatal hernia"}
PADCHEST_EXTRA = ("chronic changes", "aortic elongation", "scoliosis")
CHEXPERT_RELEASE = "CheXpert-v1.0-small"  # what every Path cell starts with
CSV_CLASSES = ("Effusion", "Cardiomegaly", "Pneumothorax", "Edema", "Nodule", "Mass")
FOLDER_CLASSES = ("cardiomegaly", "effusion", "pneumothorax")
_KINDS = ("png8", "png16", "rgb", "rgba", "jpg")


def _write_image(job: tuple[str, np.ndarray, int, int, str, str]) -> None:
    import cv2

    path, labels, size, seed, view, kind = job
    img = render(labels, size, seed, view)
    if kind == "png16":
        img = img.astype(np.uint16) * 257
    elif kind == "png12":  # PadChest's 16-bit PNGs hold 12 stored bits
        img = ((img.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)
    elif kind in ("rgb", "rgba"):
        img = np.dstack([img] * 3 + ([np.full_like(img, 255)] if kind == "rgba" else []))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if kind == "jpg" else []
    ok, buf = cv2.imencode(".jpg" if kind == "jpg" else ".png", img, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())


def _draw(jobs: list, workers: int | None) -> None:
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) >= 200:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_image(job)


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def _chexpert_cells(nih: np.ndarray, rng: np.random.Generator, official: bool) -> list[str]:
    """CheXpert's 14 observation cells (1.0 / 0.0 / -1.0 / blank) for one image."""
    from cxrembed.data.chexpert import OBSERVATIONS

    has = {name: bool(nih[i]) for i, name in enumerate(LABELS)}
    pos = {chex for n, chex in CHEXPERT_OF.items() if has[n]}
    if has["Nodule"] or has["Mass"]:
        pos.add("Lung Lesion")
    if any(has[n] for n in ("Infiltration", "Consolidation", "Pneumonia", "Atelectasis",
                            "Edema")):
        pos.add("Lung Opacity")
    if has["Pleural Thickening"]:
        pos.add("Pleural Other")
    for name, p in (("Support Devices", 0.3), ("Fracture", 0.04),
                    ("Enlarged Cardiomediastinum", 0.05)):
        if rng.random() < p:
            pos.add(name)
    cells = []
    for name in OBSERVATIONS[1:]:
        if name in pos:
            cells.append("-1.0" if not official and rng.random() < 0.1 else "1.0")
        elif official:
            cells.append("0.0")
        else:  # unmentioned is blank; a few negatives are said, a few are uncertain
            draw = rng.random()
            cells.append("0.0" if draw < 0.1 else "-1.0" if draw < 0.13 else "")
    no_finding = not (pos - {"Support Devices"})
    return ["1.0" if no_finding else ("0.0" if official else "")] + cells


def _chexpert(out: Path, plan: dict, size: int, seed: int, rng) -> list:
    from cxrembed.data.chexpert import OBSERVATIONS

    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    tables: dict[str, list] = {"train": [], "valid": []}
    jobs, study_of = [], {}
    for r in range(len(plan["patient"])):
        part = "valid" if plan["is_test"][r] else "train"
        patient = int(plan["patient"][r])
        study = study_of[patient] = study_of.get(patient, 0) + 1
        lateral = rng.random() < 0.15
        views = [("frontal", plan["view"][r])] + ([("lateral", "")] if lateral else [])
        cells = _chexpert_cells(plan["labels"][r], rng, official=part == "valid")
        for v, (kind, appa) in enumerate(views, start=1):
            rel = f"{part}/patient{patient:05d}/study{study}/view{v}_{kind}.jpg"
            tables[part].append([f"{CHEXPERT_RELEASE}/{rel}", "Male" if plan["sex"][r] == "M" else
                                 "Female", int(plan["age"][r]), kind.capitalize(), appa, *cells])
            jobs.append((str(out / rel), plan["labels"][r], size, seed * 1_000_003 + len(jobs),
                         appa or "PA", "jpg"))
    for part, rows in tables.items():
        _write_csv(out / f"{part}.csv", header, rows)
    return jobs


def _mimic(out: Path, plan: dict, size: int, seed: int, rng) -> list:
    from cxrembed.data.chexpert import OBSERVATIONS
    from cxrembed.data.mimic import image_path

    label_cols = sorted(OBSERVATIONS)  # the MIMIC file orders them alphabetically
    labels, meta, split, jobs = [], [], [], []
    subject_base, part_of = 10_000_000, {}
    for r in range(len(plan["patient"])):
        subject = str(subject_base + int(plan["patient"][r]) * 37)
        study = str(50_000_000 + r * 13)
        cells = dict(zip(OBSERVATIONS, _chexpert_cells(plan["labels"][r], rng, False)))
        if rng.random() >= 0.02:  # the labeller skipped a few studies
            labels.append([subject, study, *(cells[c] for c in label_cols)])
        part = part_of.setdefault(subject, "test" if plan["is_test"][r] else
                                  ("validate" if int(plan["patient"][r]) % 8 == 0 else "train"))
        views = [plan["view"][r]] + (["LATERAL"] if rng.random() < 0.2 else [])
        for view in views:
            dicom = "-".join(f"{rng.integers(16 ** 8):08x}" for _ in range(5))
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, size, size,
                         21800101 + r % 28, "120000.000", "CHEST (PA AND LAT)",
                         "postero-anterior" if view == "PA" else "antero-posterior"
                         if view == "AP" else "lateral", "Erect"])
            split.append([dicom, study, subject, part])
            jobs.append((str(out / image_path(subject, study, dicom)), plan["labels"][r], size,
                         seed * 1_000_003 + len(jobs), view if view != "LATERAL" else "PA",
                         "jpg"))
    _write_csv(out / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *label_cols],
               labels, gz=True)
    _write_csv(out / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"], meta, gz=True)
    _write_csv(out / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                                      "split"], split, gz=True)
    return jobs


def _padchest(out: Path, plan: dict, size: int, seed: int, rng) -> list:
    header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
              "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection",
              "Pediatric", "Modality_DICOM", "BitsStored_DICOM", "MethodLabel", "Labels"]
    patient_ids = {p: "".join(str(d) for d in rng.integers(10, size=36)) for p in
                   np.unique(plan["patient"])}
    rows, jobs = [], []
    for r in range(len(plan["patient"])):
        image_id = f"2168401113669640{r:029d}_{r % 100:02d}-{r % 997:03d}-{r % 251:03d}.png"
        folder = r % 5
        findings = [PADCHEST_OF[LABELS[k]] for k in np.flatnonzero(plan["labels"][r])]
        findings += [f for f in PADCHEST_EXTRA if rng.random() < 0.05]
        cell = repr([" " + f if i and rng.random() < 0.3 else f
                     for i, f in enumerate(findings or ["normal"])])
        if rng.random() < 0.02:
            cell = ""  # an unlabelled image, as the release has
        year = 2009 + r % 9
        projection = {"PA": "PA", "AP": "AP_horizontal" if rng.random() < 0.3 else "AP"}[
            plan["view"][r]]
        rows.append([image_id, folder, f"{year}0{1 + r % 9}1{r % 10}", f"study{r}",
                     patient_ids[plan["patient"][r]], f"{year - int(plan['age'][r])}.0",
                     plan["sex"][r], "POSTEROANTERIOR" if projection == "PA" else "ANTEROPOSTERIOR",
                     projection, "Manual review of DICOM fields", "No", "CR", 12,
                     "Physician" if rng.random() < 0.27 else "RNN_model", cell])
        jobs.append((str(out / str(folder) / image_id), plan["labels"][r], size,
                     seed * 1_000_003 + r, plan["view"][r], "png12"))
    _write_csv(out / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", header, rows)
    return jobs


def _labelled_csv(out: Path, plan: dict, size: int, seed: int, rng) -> list:
    header = ["image", "patient_id", "split", "view", "age", "sex", "findings", *CSV_CLASSES]
    rows, jobs = [], []
    for r in range(len(plan["patient"])):
        kind = _KINDS[r % len(_KINDS)]
        suffix = ".jpg" if kind == "jpg" else ".png"
        name = f"scans/{r:05d}{suffix.upper() if r % 7 == 0 else suffix}"
        has = [LABELS[k] for k in np.flatnonzero(plan["labels"][r]) if LABELS[k] in CSV_CLASSES]
        cells = [("-1" if rng.random() < 0.1 else "1") if c in has else
                 ("" if rng.random() < 0.3 else "0") for c in CSV_CLASSES]
        part = "test" if plan["is_test"][r] else ""
        rows.append([name, f"P{int(plan['patient'][r]):05d}", part, plan["view"][r],
                     int(plan["age"][r]), plan["sex"][r], "|".join(has) or "No Finding", *cells])
        jobs.append((str(out / name), plan["labels"][r], size, seed * 1_000_003 + r,
                     plan["view"][r], kind))
    _write_csv(out / "labels.csv", header, rows)
    return jobs


def _folders(out: Path, plan: dict, size: int, seed: int, rng) -> list:
    jobs = []
    for r in range(len(plan["patient"])):
        name = FOLDER_CLASSES[r % len(FOLDER_CLASSES)]
        labels = np.zeros(len(LABELS), np.uint8)
        labels[LABELS.index(name.capitalize())] = 1
        part = "test" if plan["is_test"][r] else ("val" if rng.random() < 0.1 else "train")
        jobs.append((str(out / part / name / f"{r:05d}.png"), labels, size,
                     seed * 1_000_003 + r, plan["view"][r], "png8"))
    return jobs


_WRITERS = {"chexpert": _chexpert, "mimic": _mimic, "padchest": _padchest,
            "csv": _labelled_csv, "folders": _folders}


def make_format_twin(out: str | os.PathLike, fmt: str, images: int = 400, size: int = 128,
                     seed: int = 0, workers: int | None = None) -> Path:
    """Write a synthetic collection in ``fmt``'s real layout (module docstring); return
    ``out``. ``images`` counts studies for CheXpert and MIMIC (a few get a lateral too)."""
    if fmt == "nih":
        from cxrembed.data.synth import make_twin

        return make_twin(out, images=images, size=size, seed=seed, workers=workers)
    if fmt not in _WRITERS:
        raise ConfigError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if images < 20:
        raise ConfigError(f"--images {images} is too few for a twin with splits; use 20 or more")
    if size < 32:
        raise ConfigError(f"--size {size} is too small to draw findings; use 32 or more")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(images, seed, min_positives=3)
    jobs = _WRITERS[fmt](out, plan, size, seed, np.random.default_rng(seed + 7))
    _draw(jobs, workers)
    (out / "synth.json").write_text(json.dumps({
        "generator": "cxrembed.data.synth_formats.make_format_twin", "format": fmt,
        "images": len(jobs), "size": size, "seed": seed}, indent=2), encoding="utf-8")
    log.info("wrote a synthetic %s twin of %d images to %s", fmt, len(jobs), out)
    return out
