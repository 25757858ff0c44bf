"""Readers of CheXpert, MIMIC-CXR-JPG, PadChest, a labelled CSV and class folders, on
synthetic twins written in the real layouts; every check reads the files independently."""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrembed.data import assert_patient_disjoint, load_dataset
from cxrembed.data.chexpert import LABELS as CHEXPERT_LABELS
from cxrembed.data.synth_formats import make_format_twin
from cxrembed.errors import ConfigError, DataError

CSV_OPTIONS = dict(image_col="image", label_cols="Effusion,Cardiomegaly,Pneumothorax,Edema,"
                   "Nodule,Mass", patient_col="patient_id", split_col="split", view_col="view",
                   age_col="age", sex_col="sex")


@pytest.fixture(scope="session")
def twins(tmp_path_factory) -> dict[str, Path]:
    """One small twin per format (read-only: copy before changing one)."""
    base = tmp_path_factory.mktemp("formats")
    return {fmt: make_format_twin(base / fmt, fmt, images=80, size=48, seed=1, workers=1)
            for fmt in ("chexpert", "mimic", "padchest", "csv", "folders")}


def _copy(twins, fmt, tmp_path) -> Path:
    return Path(shutil.copytree(twins[fmt], tmp_path / fmt))


def _rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _rewrite(path: Path, change) -> None:
    rows = _rows(path)
    change(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------
# Each format read as its real files say


@pytest.mark.parametrize("fmt", ["chexpert", "mimic", "padchest", "folders"])
def test_auto_detection_picks_the_reader(twins, fmt):
    ds = load_dataset(twins[fmt])
    assert ds.dataset == fmt and ds.present.all()
    assert_patient_disjoint(ds.patient_id, ds.split)
    assert set(ds.split) == {"train", "val", "test"}


def test_chexpert_rows_labels_and_uncertain_policies(twins):
    root = twins["chexpert"]
    cells = _rows(root / "train.csv") + _rows(root / "valid.csv")
    ds = load_dataset(root, "chexpert")
    assert ds.label_names == CHEXPERT_LABELS and len(ds) == len(cells)
    by_id = {r["Path"].split("/", 1)[1]: r for r in cells}  # "CheXpert-v1.0-small/" dropped
    assert set(ds.image_id) == set(by_id)
    for policy in ("ignore", "ones", "zeros"):
        got = load_dataset(root, "chexpert", uncertain=policy)
        for i, image in enumerate(got.image_id):
            for k, name in enumerate(CHEXPERT_LABELS):
                cell = by_id[image][name]
                want = {"1.0": 1, "0.0": 0, "": 0, "-1.0": int(policy == "ones")}[cell]
                assert got.labels[i, k] == want, (image, name, cell, policy)
                assert got.label_known[i, k] == (cell != "-1.0" or policy != "ignore")
    assert (~ds.label_known).any()  # the twin has uncertain cells
    unknown_blank = load_dataset(root, "chexpert", blank="unknown")
    blanks = np.array([[by_id[i][n] == "" for n in CHEXPERT_LABELS] for i in ds.image_id])
    assert not unknown_blank.label_known[blanks].any()


def test_chexpert_valid_is_val_and_test_is_a_patient_share_of_train(twins, tmp_path):
    root = twins["chexpert"]
    ds = load_dataset(root, "chexpert", test_fraction=0.3, seed=3)
    valid = {r["Path"].split("/", 1)[1] for r in _rows(root / "valid.csv")}
    assert set(ds.image_id[ds.split == "val"]) == valid
    test_patients = np.unique(ds.patient_id[ds.split == "test"])
    train_patients = np.unique(ds.patient_id[ds.split == "train"])
    assert len(test_patients) == round(0.3 * (len(test_patients) + len(train_patients)))
    assert all(p.startswith(("train/", "valid/")) for p in ds.image_id)
    # With the CheXpert test CSV present, test is that file.
    copy = _copy(twins, "chexpert", tmp_path)
    shutil.copy(copy / "valid.csv", copy / "test.csv")
    (copy / "valid.csv").write_text((copy / "valid.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="header but no rows"):
        load_dataset(copy, "chexpert")
    (copy / "valid.csv").unlink()
    moved = load_dataset(copy, "chexpert")
    assert set(moved.image_id[moved.split == "test"]) == valid


def test_mimic_official_split_study_labels_and_paths(twins):
    root = twins["mimic"]
    ds = load_dataset(root, "mimic")
    meta = _rows(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = {r["dicom_id"]: r["split"] for r in _rows(root / "mimic-cxr-2.0.0-split.csv.gz")}
    labels = {r["study_id"]: r for r in _rows(root / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    assert len(ds) == len(meta)
    row_of = {d: i for i, d in enumerate(ds.image_id)}
    for m in meta:
        i = row_of[m["dicom_id"]]
        assert ds.split[i] == {"validate": "val"}.get(split[m["dicom_id"]], split[m["dicom_id"]])
        s = m["subject_id"]
        assert ds.path[i].endswith(f"files/p{s[:2]}/p{s}/s{m['study_id']}/{m['dicom_id']}.jpg")
        assert ds.view[i] == m["ViewPosition"]
        study = labels.get(m["study_id"])
        if study is None:  # a study the labeller skipped: nothing known
            assert not ds.label_known[i].any()
            continue
        for k, name in enumerate(CHEXPERT_LABELS):
            assert ds.labels[i, k] == (study[name] == "1.0")
            assert ds.label_known[i, k] == (study[name] != "-1.0")
    assert np.isnan(ds.age).all() and "no age or sex" in " ".join(ds.notes)


def test_padchest_labels_are_parsed_not_evaluated(twins, tmp_path):
    root = twins["padchest"]
    ds = load_dataset(root, "padchest")
    rows = [r for r in _rows(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
            if r["Labels"]]
    assert len(ds) == len(rows)
    assert "normal" not in ds.label_names and "pleural effusion" in ds.label_names
    assert all(n == n.strip() for n in ds.label_names)  # " pleural effusion" is stripped
    for i, r in enumerate(rows):
        names = {ds.label_names[k] for k in np.flatnonzero(ds.labels[i])}
        written = {t.strip(" '") for t in r["Labels"].strip("[]").split(",")} - {"normal"}
        assert names == written
    assert set(ds.view) <= {"PA", "AP", "AP_HORIZONTAL"}
    copy = _copy(twins, "padchest", tmp_path)
    path = copy / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    canary = tmp_path / "evaluated"
    _rewrite(path, lambda rows: rows[0].update(
        Labels=f"__import__('pathlib').Path('{canary}').touch()"))
    with pytest.raises(DataError, match="row 2.*'Labels'.*not a Python list"):
        load_dataset(copy, "padchest")
    assert not canary.exists()


def test_padchest_12_bit_pngs_decode_like_their_8_bit_twin(twins, tmp_path):
    import cv2

    from cxrembed.data.images import decode

    ds = load_dataset(twins["padchest"])
    raw = cv2.imread(ds.path[0], cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and 255 < raw.max() <= 4095  # 12 bits stored, as PadChest
    eight = tmp_path / "eight.png"
    cv2.imwrite(str(eight), np.round(raw / 4095 * 255).astype(np.uint8))
    assert np.abs(decode(ds.path[0], size=48).astype(int) - decode(eight, size=48)).max() <= 1
    full = tmp_path / "full.png"  # the same image over the whole 16-bit range
    cv2.imwrite(str(full), (raw.astype(np.uint32) * 65535 // 4095).astype(np.uint16))
    assert np.abs(decode(full, size=48).astype(int) - decode(eight, size=48)).max() <= 1


def test_csv_label_columns_and_text_column_agree(twins):
    root = twins["csv"]
    cols = load_dataset(root, "csv", **CSV_OPTIONS, uncertain="ones", blank="negative")
    text = load_dataset(root, "csv", image_col="image", label_col="findings", label_sep="|",
                        patient_col="patient_id", split_col="split")
    assert np.array_equal(cols.image_id, text.image_id)
    for k, name in enumerate(cols.label_names):
        if name in text.label_names:
            assert np.array_equal(cols.labels[:, k], text.labels[:, text.label_names.index(name)])
        else:  # a class no image carries never appears in the text column
            assert cols.labels[:, k].sum() == 0
    written = _rows(root / "labels.csv")
    assert set(cols.image_id[cols.split == "test"]) == {r["image"] for r in written
                                                        if r["split"] == "test"}
    assert cols.present.all() and any(p.endswith(".PNG") for p in cols.path)


def test_csv_images_of_every_kind_decode(twins):
    from cxrembed.data.images import decode

    ds = load_dataset(twins["csv"], "csv", **CSV_OPTIONS)
    kinds = {Path(p).suffix for p in ds.path}
    assert {".png", ".PNG", ".jpg"} <= kinds
    pixels = np.stack([decode(p, size=32) for p in ds.path[:10]])
    assert pixels.shape == (10, 32, 32) and pixels.std() > 5


def test_folders_with_split_folders(twins):
    root = twins["folders"]
    ds = load_dataset(root)
    assert ds.label_names == ("cardiomegaly", "effusion", "pneumothorax")
    for i, rel in enumerate(ds.image_id):
        split, cls, _ = rel.split("/")
        assert ds.split[i] == split and ds.label_names[int(np.argmax(ds.labels[i]))] == cls
    assert (ds.labels.sum(axis=1) == 1).all()
    assert len(np.unique(ds.patient_id)) == len(ds) and "own patient" in ds.notes[0]


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_dataset_lists_the_choices(twins):
    with pytest.raises(ConfigError, match=r"'chexprt'.*did you mean 'chexpert'.*folders"):
        load_dataset(twins["chexpert"], "chexprt")


def test_undetectable_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="--dataset"):
        load_dataset(tmp_path)


def test_option_of_another_reader_is_refused(twins):
    with pytest.raises(ConfigError, match="--label-cols does not apply to --dataset chexpert"):
        load_dataset(twins["chexpert"], label_cols="A,B")


def test_csv_without_the_named_column_lists_the_columns(twins):
    with pytest.raises(DataError, match=r"no column 'Effusions'.*--label-cols.*'image', "
                                        r"'patient_id'"):
        load_dataset(twins["csv"], "csv", **{**CSV_OPTIONS, "label_cols": "Effusions"})
    with pytest.raises(DataError, match=r"lacks column\(s\) 'Pleural Effusion'.*'Path'"):
        load_dataset(_without_column(twins["chexpert"], "Pleural Effusion"), "chexpert")


def _without_column(root: Path, column: str) -> Path:
    copy = root.parent / f"{root.name}-without"
    if not copy.exists():
        shutil.copytree(root, copy)
        for name in ("train.csv", "valid.csv"):
            _rewrite(copy / name, lambda rows: [r.pop(column) for r in rows])
    return copy


@pytest.mark.parametrize("value", ["2", "yes please", "0.5"])
def test_label_value_outside_0_1_minus1_blank(twins, tmp_path, value):
    copy = _copy(twins, "csv", tmp_path)
    _rewrite(copy / "labels.csv", lambda rows: rows[3].update(Mass=value))
    with pytest.raises(DataError, match=rf"labels.csv, row 5 \(scans/00003.png\), column "
                                        rf"'Mass': value '{value}' is not a label"):
        load_dataset(copy, "csv", **CSV_OPTIONS)


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "scans/../../x.png"])
def test_image_path_escaping_the_data_folder(twins, tmp_path, bad):
    copy = _copy(twins, "csv", tmp_path)
    _rewrite(copy / "labels.csv", lambda rows: rows[0].update(image=bad))
    with pytest.raises(DataError, match="row 2.*(leaves the data folder|is absolute)"):
        load_dataset(copy, "csv", **CSV_OPTIONS)


def test_chexpert_path_escaping_the_data_folder(twins, tmp_path):
    copy = _copy(twins, "chexpert", tmp_path)
    _rewrite(copy / "valid.csv", lambda rows: rows[0].update(
        Path="CheXpert-v1.0-small/../../secret/patient00001/study1/view1_frontal.jpg"))
    with pytest.raises(DataError, match="valid.csv, row 2.*leaves the data folder"):
        load_dataset(copy, "chexpert")


@pytest.mark.parametrize("fmt", ["chexpert", "mimic", "padchest", "csv"])
def test_missing_images_error_then_drop(twins, tmp_path, fmt):
    copy = _copy(twins, fmt, tmp_path)
    options = CSV_OPTIONS if fmt == "csv" else {}
    full = load_dataset(copy, fmt, **options)
    for path in full.path[:3]:
        Path(path).unlink()
    with pytest.raises(DataError, match=r"3 of \d+ images.*--allow-missing"):
        load_dataset(copy, fmt, **options)
    dropped = load_dataset(copy, fmt, missing="drop", **options)
    assert len(dropped) == len(full) - 3 and dropped.present.all()
    kept = load_dataset(copy, fmt, missing="keep", **options)
    assert kept.summary()["images_missing"] == 3


def test_two_rows_of_one_image(twins, tmp_path):
    copy = _copy(twins, "csv", tmp_path)
    _rewrite(copy / "labels.csv", lambda rows: rows.append(dict(rows[0])))
    with pytest.raises(DataError, match="more than once.*scans/00000.PNG"):
        load_dataset(copy, "csv", **CSV_OPTIONS)


def test_a_patient_in_two_splits_is_refused(twins, tmp_path):
    copy = _copy(twins, "csv", tmp_path)

    def clash(rows):
        first = rows[0]["patient_id"]
        other = next(r for r in rows if r["patient_id"] == first and r is not rows[0])
        rows[0]["split"], other["split"] = "train", "test"

    _rewrite(copy / "labels.csv", clash)
    with pytest.raises(DataError, match="patient-disjoint"):
        load_dataset(copy, "csv", **CSV_OPTIONS)


def test_unknown_view_lists_the_views_there_are(twins):
    with pytest.raises(DataError, match=r"unknown view 'PX'.*AP, LATERAL, PA"):
        load_dataset(twins["mimic"], view="PX")
    frontal = load_dataset(twins["mimic"], view="frontal")
    assert set(frontal.view) == {"PA", "AP"}
    assert set(load_dataset(twins["chexpert"], view="lateral").view) == {"LATERAL"}
