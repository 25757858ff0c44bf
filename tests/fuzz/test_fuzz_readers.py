"""Every dataset reader, fed hostile metadata: only cxrembed's own errors escape."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxrembed.data.nih import REQUIRED_COLUMNS
from cxrembed.data.readers import load_dataset
from fuzz_inputs import CELLS, cell, csv_file, file_name, folder, only_cxrembed_errors

pytestmark = pytest.mark.timeout(120)

NIH_IMAGES = ["00000001_000.png", "00000002_000.png", "00000003_001.png"]
common_options = st.fixed_dictionaries({
    "missing": st.sampled_from(["error", "drop", "keep", "bogus"]),
    "view": st.sampled_from(["all", "PA", "AP", "frontal", "lateral", "PA,AP", "", "x"]),
    "val_fraction": st.sampled_from([0.1, 0.0, 0.5, 1.0, -0.1, 2.0]) | st.floats(),
    "seed": st.sampled_from([7, 0]) | st.integers(-2**70, 2**70),
})


def _images(root, names) -> None:
    for name in names:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n")  # decoding comes later (encode)


def _check(table) -> None:
    if table is not None:
        n = len(table.image_id)
        assert table.labels.shape == (n, len(table.label_names))
        assert table.label_known.shape == table.labels.shape
        assert set(table.split.tolist()) <= {"train", "val", "test"}


@given(meta=csv_file(REQUIRED_COLUMNS), train_val=st.lists(st.sampled_from(NIH_IMAGES) | cell,
       max_size=4), test=st.lists(st.sampled_from(NIH_IMAGES) | cell, max_size=3),
       raw_list=st.none() | st.binary(max_size=40), options=common_options)
def test_nih_reader(meta, train_val, test, raw_list, options):
    with folder() as root:
        (root / "Data_Entry_2017.csv").write_bytes(meta)
        (root / "train_val_list.txt").write_text("\n".join(train_val), encoding="utf-8",
                                                 errors="replace")
        (root / "test_list.txt").write_bytes(raw_list if raw_list is not None else
                                             "\n".join(test).encode("utf-8", "replace"))
        _images(root, NIH_IMAGES[:2])
        _check(only_cxrembed_errors(lambda: load_dataset(root, "nih", **options)))


CHEXPERT = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
            "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
            "Pleural Other", "Fracture", "Support Devices")


@given(train=csv_file(CHEXPERT), valid=st.none() | csv_file(CHEXPERT),
       uncertain=st.sampled_from(["ignore", "ones", "zeros", "maybe"]),
       blank=st.sampled_from(["negative", "unknown", "?"]), options=common_options)
def test_chexpert_reader(train, valid, uncertain, blank, options):
    with folder() as root:
        (root / "train.csv").write_bytes(train)
        if valid is not None:
            (root / "valid.csv").write_bytes(valid)
        (root / "train" / "patient00001" / "study1").mkdir(parents=True)
        _images(root / "train" / "patient00001" / "study1", ["view1_frontal.jpg"])
        _check(only_cxrembed_errors(lambda: load_dataset(
            root, "chexpert", uncertain=uncertain, blank=blank, **options)))


MIMIC_LABELS = ("subject_id", "study_id") + CHEXPERT[6:]


@given(labels=csv_file(MIMIC_LABELS), meta=csv_file(("dicom_id", "subject_id", "study_id",
                                                      "ViewPosition")),
       split=st.none() | csv_file(("dicom_id", "study_id", "subject_id", "split")),
       gz=st.booleans(), options=common_options)
def test_mimic_reader(labels, meta, split, gz, options):
    import gzip

    def put(path, data):
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
        else:
            path.write_bytes(data)

    with folder() as root:
        put(root / "mimic-cxr-2.0.0-chexpert.csv", labels)
        put(root / "mimic-cxr-2.0.0-metadata.csv", meta)
        if split is not None:
            put(root / "mimic-cxr-2.0.0-split.csv", split)
        _check(only_cxrembed_errors(lambda: load_dataset(root, "mimic", **options)))


@given(table=csv_file(("ImageID", "ImageDir", "PatientID", "Projection", "Labels",
                       "PatientBirth", "StudyDate_DICOM", "PatientSex_DICOM")),
       options=common_options)
def test_padchest_reader(table, options):
    with folder() as root:
        (root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_bytes(table)
        (root / "0").mkdir()
        _images(root / "0", ["00000001_000.png"])
        _check(only_cxrembed_errors(lambda: load_dataset(root, "padchest", **options)))


column = st.sampled_from(["image", "label", "patient", "split", "view", "age", "sex", "A", "B",
                          "absent", ""]) | st.none()


@given(table=csv_file(("image", "label", "patient", "split", "view", "age", "sex", "A", "B")),
       image_col=column, label_cols=st.none() | st.sampled_from(["A,B", "A", "A,,B", " A , B",
                                                                  ",", "absent", "A,A"]),
       label_col=column, label_sep=st.sampled_from(["|", "/", "", ",", "||"]),
       patient_col=column, split_col=column, view_col=column, age_col=column, sex_col=column,
       test_fraction=st.sampled_from([0.1, 0.0, 0.99, 1.0, -1.0]) | st.floats(),
       options=common_options)
def test_csv_reader_with_its_column_options(table, image_col, label_cols, label_col,
                                            label_sep, patient_col, split_col, view_col,
                                            age_col, sex_col, test_fraction, options):
    with folder() as root:
        (root / "labels.csv").write_bytes(table)
        (root / "img").mkdir()
        _images(root / "img", ["a.png"])
        _images(root, ["x.png"])
        _check(only_cxrembed_errors(lambda: load_dataset(
            root, "csv", image_col=image_col, label_cols=label_cols, label_col=label_col,
            label_sep=label_sep, patient_col=patient_col, split_col=split_col,
            view_col=view_col, age_col=age_col, sex_col=sex_col, test_fraction=test_fraction,
            **options)))


@given(layout=st.lists(st.tuples(st.sampled_from(["", "train", "val", "valid", "test", "TEST"]),
                                 file_name, file_name.map(lambda n: n + ".png") | file_name),
                       max_size=6),
       options=common_options)
def test_folders_reader_with_any_folder_names(layout, options):
    with folder() as root:
        for split, name, image in layout:
            where = root / split / name if split else root / name
            try:
                where.mkdir(parents=True, exist_ok=True)
                (where / image).write_bytes(b"x")
            except OSError:  # a name the file system refuses (too long, a file there)
                continue
        _check(only_cxrembed_errors(lambda: load_dataset(root, "folders", **options)))


@given(root_is=st.sampled_from(["missing", "file", "csv-file", "empty"]),
       dataset=st.sampled_from(["auto", "nih", "csv", "folders", "mimic", "padchest", "chexpert",
                                "NIH", "nhi", ""]))
def test_auto_detection_of_odd_folders(root_is, dataset):
    with folder() as base:
        root = base / "data"
        if root_is == "file":
            root.write_bytes(b"hello")
        elif root_is == "csv-file":
            root = base / "data.csv"
            root.write_text("a,b\n1,2\n")
        elif root_is == "empty":
            root.mkdir()
        only_cxrembed_errors(lambda: load_dataset(root, dataset))


assert CELLS  # the shared hostile cells are used through ``cell``


def test_ci_profile_has_no_deadline_the_long_one_has():
    """A deadline flakes on a loaded CI CPU (pytest-timeout catches hangs there); a long
    campaign keeps one so a slow parser is seen."""
    from hypothesis import settings

    assert settings.get_profile("cxrembed-ci").deadline is None
    assert settings.get_profile("cxrembed-long").deadline is not None
