"""The NIH reader: layouts, metadata, lists, patient splits, filters, and bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrembed.data import SPLITS, assert_patient_disjoint, load_nih
from cxrembed.data.nih import read_metadata
from cxrembed.errors import DataError
from cxrembed.labels import LABELS, parse_finding_labels


@pytest.fixture()
def twin_copy(twin, tmp_path) -> Path:
    dst = tmp_path / "nih"
    shutil.copytree(twin, dst)
    return dst


def _csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def test_twin_loads_with_every_row_and_label(twin):
    ds = load_nih(twin)
    rows = _csv_rows(twin / "Data_Entry_2017.csv")
    assert len(ds) == len(rows) == 240
    assert ds.image_id.tolist() == [r[0] for r in rows]
    expected = np.stack([parse_finding_labels(r[1]) for r in rows])
    assert np.array_equal(ds.labels, expected)
    assert set(ds.split) == set(SPLITS)
    assert ds.present.all()
    test_names = (twin / "test_list.txt").read_text().split("\n")
    assert sorted(ds.image_id[ds.split == "test"]) == sorted(test_names)


def test_splits_are_patient_disjoint_and_seeded(twin):
    ds = load_nih(twin, val_fraction=0.2, seed=3)
    assert_patient_disjoint(ds.patient_id, ds.split)
    tv_patients = np.unique(ds.patient_id[ds.split != "test"])
    val_patients = np.unique(ds.patient_id[ds.split == "val"])
    assert len(val_patients) == round(0.2 * len(tv_patients))
    again = load_nih(twin, val_fraction=0.2, seed=3)
    assert np.array_equal(ds.split, again.split)
    other = load_nih(twin, val_fraction=0.2, seed=4)
    assert not np.array_equal(ds.split, other.split)
    # The test split is the official list whatever the seed.
    assert np.array_equal(ds.split == "test", other.split == "test")


def test_assert_patient_disjoint_catches_a_shared_patient():
    split = np.array(["train", "val", "test"])
    with pytest.raises(DataError, match="patient"):
        assert_patient_disjoint(np.array([1, 1, 2]), split)


@pytest.mark.parametrize("layout", ["official", "images", "flat"])
def test_every_layout_finds_the_same_images(twin, tmp_path, layout):
    src = twin / "images_001" / "images"
    root = tmp_path / layout
    shutil.copytree(twin, root, ignore=shutil.ignore_patterns("images_001"))
    target = {"official": root / "images_001" / "images", "images": root / "images",
              "flat": root}[layout]
    target.mkdir(parents=True, exist_ok=True)
    for png in src.iterdir():
        shutil.copy(png, target / png.name)
    ds = load_nih(root)
    assert len(ds) == 240 and ds.present.all()
    assert all(Path(p).parent == target for p in ds.path)


def test_official_layout_over_several_folders(twin, tmp_path):
    root = tmp_path / "nih"
    shutil.copytree(twin, root)
    pngs = sorted((root / "images_001" / "images").iterdir())
    (root / "images_002" / "images").mkdir(parents=True)
    for png in pngs[120:]:
        png.rename(root / "images_002" / "images" / png.name)
    ds = load_nih(root)
    assert ds.present.all() and sum("images_002" in p for p in ds.path) == 120


def test_gzip_metadata_reads_the_same(twin_copy):
    plain = twin_copy / "Data_Entry_2017.csv"
    with open(plain, "rb") as f, gzip.open(twin_copy / "Data_Entry_2017_v2020.csv.gz", "wb") as g:
        g.write(f.read())
    a = load_nih(twin_copy)
    plain.unlink()
    b = load_nih(twin_copy)
    assert b.sources["metadata"].endswith(".csv.gz")
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.split, b.split)


def test_missing_metadata_names_file_release_and_option(twin_copy):
    (twin_copy / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match=r"Data_Entry_2017.*--csv"):
        load_nih(twin_copy)


def test_missing_list_names_option(twin_copy, tmp_path):
    moved = tmp_path / "elsewhere.txt"
    (twin_copy / "test_list.txt").rename(moved)
    with pytest.raises(DataError, match=r"test_list.txt.*--test-list"):
        load_nih(twin_copy)
    assert len(load_nih(twin_copy, test_list=moved)) == 240


def test_csv_without_columns_names_them(twin_copy):
    path = twin_copy / "Data_Entry_2017.csv"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("View Position", "Projection")
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="'View Position'"):
        load_nih(twin_copy)


def test_unknown_label_names_file_row_and_value(twin_copy):
    path = twin_copy / "Data_Entry_2017.csv"
    lines = path.read_text().splitlines()
    name = lines[3].split(",")[0]
    parts = lines[3].split(",")
    parts[1] = "Covid"
    lines[3] = ",".join(parts)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"row 4 \({name}\).*'Covid'"):
        load_nih(twin_copy)


def test_list_naming_unknown_image(twin_copy):
    path = twin_copy / "test_list.txt"
    path.write_text(path.read_text() + "\n99999999_000.png")
    with pytest.raises(DataError, match="99999999_000.png"):
        load_nih(twin_copy)


def test_missing_images_error_then_drop(twin_copy):
    pngs = sorted((twin_copy / "images_001" / "images").iterdir())
    for png in pngs[:10]:
        png.unlink()
    with pytest.raises(DataError, match=r"10 of 240 images.*--allow-missing"):
        load_nih(twin_copy)
    ds = load_nih(twin_copy, missing="drop")
    assert len(ds) == 230 and ds.present.all() and len(ds.missing) == 10
    kept = load_nih(twin_copy, missing="keep")
    assert len(kept) == 240 and (~kept.present).sum() == 10
    assert kept.summary()["images_missing"] == 10


def test_no_images_at_all_says_so(twin_copy):
    shutil.rmtree(twin_copy / "images_001")
    with pytest.raises(DataError, match="none of the 240 images"):
        load_nih(twin_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_nih(tmp_path / "nope")


def test_view_filter(twin):
    ds = load_nih(twin)
    pa = load_nih(twin, view="PA")
    assert len(pa) == (ds.view == "PA").sum() and set(pa.view) == {"PA"}
    with pytest.raises(DataError, match="LATERAL"):
        load_nih(twin, view="LATERAL")


@pytest.mark.real_nih
def test_real_metadata_counts_match_the_official_csv(shared_nih):
    meta = read_metadata(shared_nih / "Data_Entry_2017_v2020.csv.gz")
    assert len(meta["image_id"]) == 112_120
    assert len(np.unique(meta["patient_id"])) == 30_805
    assert meta["labels"][:, LABELS.index("Pleural Thickening")].sum() > 3000
    # Per-class counts straight from the text, independent of the parser.
    import csv
    import gzip as gz

    with gz.open(shared_nih / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as f:
        cells = [r[1] for r in list(csv.reader(f))[1:]]
    for k, name in enumerate(LABELS):
        spelled = name.replace("Pleural Thickening", "Pleural_Thickening")
        assert meta["labels"][:, k].sum() == sum(spelled in c.split("|") for c in cells)


@pytest.mark.real_nih
def test_real_lists_give_patient_disjoint_splits(shared_nih, tmp_path):
    ds = load_nih(shared_nih / "sample", csv_path=shared_nih / "Data_Entry_2017_v2020.csv.gz",
                  train_val_list=shared_nih / "train_val_list.txt",
                  test_list=shared_nih / "test_list.txt", missing="keep")
    assert (ds.split == "test").sum() == 25_596
    assert len(np.unique(ds.patient_id[ds.split == "test"])) == 2_797
    assert_patient_disjoint(ds.patient_id, ds.split)
    assert ds.present.sum() == 33
    present = load_nih(shared_nih / "sample",
                       csv_path=shared_nih / "Data_Entry_2017_v2020.csv.gz",
                       train_val_list=shared_nih / "train_val_list.txt",
                       test_list=shared_nih / "test_list.txt", missing="drop")
    assert len(present) == 33 and present.present.all()
