"""Hostile files other than images: symbolic links leading out of the data folder, a
weights file whose pickle would run code, a store whose attributes lie about its shape."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrembed.data.readers import load_dataset
from cxrembed.errors import DataError, StoreError
from cxrembed.store import EmbeddingStore, StoreWriter


def _png(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((32, 32), 128, np.uint8))


@pytest.fixture
def outside(tmp_path):
    """A private file and folder outside every data folder of the test."""
    secret = tmp_path / "private" / "secret.png"
    _png(secret)
    return secret


def test_symlinks_leading_out_of_the_data_folder_are_refused(tmp_path, outside):
    # the generic CSV reader: one image linked to a file outside, one linked inside
    data = tmp_path / "csvdata"
    _png(data / "img" / "a.png")
    (data / "img" / "inside.png").symlink_to(data / "img" / "a.png")
    (data / "labels.csv").write_text("image,Mass\nimg/a.png,1\nimg/inside.png,0\n")
    assert len(load_dataset(data, "csv", image_col="image", label_cols="Mass")) == 2
    (data / "img" / "b.png").symlink_to(outside)
    (data / "labels.csv").write_text("image,Mass\nimg/a.png,1\nimg/b.png,0\n")
    with pytest.raises(DataError, match=r"symbolic link.*b\.png -> .*secret\.png"):
        load_dataset(data, "csv", image_col="image", label_cols="Mass")
    # class folders: a class folder that is a link to a folder outside
    folders = tmp_path / "folders"
    _png(folders / "normal" / "n.png")
    (folders / "effusion").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(DataError, match=r"symbolic link.*effusion.*secret\.png"):
        load_dataset(folders, "folders")
    # NIH: an image of the release linked to a file outside
    nih = tmp_path / "nih"
    _png(nih / "images" / "00000001_000.png")
    (nih / "images" / "00000002_000.png").symlink_to(outside)
    (nih / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n00000001_000.png,No Finding,0,1,50,M,PA\n"
        "00000002_000.png,Mass,0,2,60,F,PA\n")
    (nih / "train_val_list.txt").write_text("00000001_000.png")
    (nih / "test_list.txt").write_text("00000002_000.png")
    with pytest.raises(DataError, match=r"symbolic link.*00000002_000\.png -> .*secret"):
        load_dataset(nih, "nih")


class Payload:
    """Unpickling this runs ``os.makedirs(marker)``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.slow  # a cxrembed process: ~4 s of imports on an idle 2-core machine
def test_weights_whose_pickle_runs_code_are_refused_by_the_command(tmp_path):
    import torch

    marker = tmp_path / "the_payload_ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload(str(marker))},
               tmp_path / "evil.pt")
    data = tmp_path / "data"
    _png(data / "normal" / "n.png")
    _png(data / "mass" / "m.png")
    script = Path(sys.executable).with_name("cxrembed")  # the installed command
    command = [str(script) if script.is_file() else shutil.which("cxrembed"), "encode",
               str(data), "--dataset",
               "folders", "--model", "cxr-tiny", "--pretrained", str(tmp_path / "evil.pt"),
               "--out", str(tmp_path / "s.h5"), "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 1, done.stderr
    assert "refusing to load" in done.stderr and "--trust-pickle" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "s.h5").exists()


@pytest.fixture
def store_path(tmp_path):
    from cxrembed.store.schema import ROW_FIELDS

    n, dim = 30, 4
    rows = {name: (np.array([f"{i:03d}.png" for i in range(n)]) if name == "image_id" else
                   np.zeros((n, 14), np.uint8) if name == "labels" else
                   np.array(["train"] * n) if name == "split" else
                   np.array([""] * n) if kind == "S" else np.zeros(n, kind))
            for name, kind in ROW_FIELDS.items()}
    path = tmp_path / "s.h5"
    with StoreWriter.create(path, rows=rows, embed_dim=dim, fingerprint={"model": "x"},
                            has_head=False, has_text=False, batch_size=10,
                            chunk_rows=10) as writer:
        writer.append(np.ones((n, dim), np.float32))
        writer.finish()
    return path


@pytest.mark.parametrize("lie, message", [
    ({"num_rows": 40}, r"dataset 'image_id' has shape \(30,\), but num_rows \(40\)"),
    ({"num_rows": 20}, r"dataset 'image_id' has shape \(30,\), but num_rows \(20\)"),
    ({"embed_dim": 8}, r"dataset 'embedding' has shape \(30, 4\), but .*embed_dim \(8\)"),
    ({"label_names": json.dumps(["Mass"])}, r"'labels' has shape \(30, 14\).*1 label_names"),
    ({"num_rows": "30"}, r"attribute num_rows is '30', expected a whole number"),
    ({"fingerprint": "{not json"}, r"fingerprint is not valid JSON"),
    ({"has_text": True}, r"has_text is set but it has no text"),
    ({"rows_done": 12}, r"marked complete with 12 of 30 rows"),
])
def test_a_store_whose_attributes_lie_about_its_shape_is_refused(store_path, lie, message):
    import h5py

    with h5py.File(store_path, "r+") as f:
        for key, value in lie.items():
            if key == "rows_done":
                f["rows_done"][0] = value
            else:
                f.attrs[key] = value
    with pytest.raises(StoreError, match=message):
        EmbeddingStore.open(store_path)


@pytest.mark.parametrize("recorded", ["../private/secret.png", "{outside}",
                                      "img/../../private/secret.png", "img/link.png"])
def test_a_store_never_makes_search_or_serve_read_a_file_outside_the_data_folder(
        store_path, tmp_path, outside, recorded):
    import h5py

    from cxrembed.montage import stored_image_path

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "link.png").symlink_to(outside)
    recorded = recorded.format(outside=outside)
    with h5py.File(store_path, "r+") as f:
        paths = f["image_path"][:]
        del f["image_path"]
        paths[:] = b""
        f["image_path"] = np.array([recorded.encode()] + [b""] * (len(paths) - 1))
    assert (data / recorded).is_file()  # the file is there to be read...
    with EmbeddingStore.open(store_path) as store:
        assert stored_image_path(store, 0, data) is None  # ...and is not


@pytest.fixture
def linked_nih(tmp_path):
    """An NIH folder whose images_001 is a link the user made to a bigger disk."""
    rng = np.random.default_rng(0)
    disk = tmp_path / "bigdisk" / "images_001" / "images"
    disk.mkdir(parents=True)
    names = [f"0000000{i}_000.png" for i in range(1, 9)]
    for name in names:
        cv2.imwrite(str(disk / name), rng.integers(0, 255, (32, 32), dtype=np.uint8))
    nih = tmp_path / "nih"
    nih.mkdir()
    (nih / "images_001").symlink_to(disk.parent, target_is_directory=True)
    (nih / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n" + "".join(f"{n},{'Mass' if i % 2 else 'No Finding'},0,{i + 1},50,"
                                    f"M,PA\n" for i, n in enumerate(names)))
    (nih / "train_val_list.txt").write_text("\n".join(names[:6]))
    (nih / "test_list.txt").write_text("\n".join(names[6:]))
    return nih


def _cli(*args):
    from typer.testing import CliRunner

    from cxrembed.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (str(result.exception)
                                              if result.exception else "")


def test_links_the_user_made_are_followed_with_follow_links(linked_nih, tmp_path):
    from fastapi.testclient import TestClient

    from cxrembed.montage import stored_image_path
    from cxrembed.serve import create_app, open_service

    code, said = _cli("info", linked_nih)
    assert code != 0 and "symbolic link" in said and "--follow-links" in said
    code, said = _cli("info", linked_nih, "--follow-links", "--json")
    assert code == 0, said
    assert json.loads(said[said.index("{"):])["images"] == 8
    out = tmp_path / "s.h5"
    code, said = _cli("encode", linked_nih, "--follow-links", "--model", "cxr-tiny",
                      "--pretrained", "none", "--out", out, "--device", "cpu",
                      "--no-progress", "--batch-size", "4")
    assert code == 0, said
    with EmbeddingStore.open(out) as store:
        assert store.attrs["follow_links"] is True and len(store) == 8
        path = stored_image_path(store, 0, linked_nih)
        assert path is not None and "bigdisk" in os.path.realpath(path)
        first = str(store.image_id[0])
    service = open_service(out)  # the store's dataset_root: the linked folder
    try:
        client = TestClient(create_app(service), base_url="http://127.0.0.1")
        thumb = client.get(f"/api/thumb/{first}")
        assert thumb.status_code == 200, thumb.text
        assert thumb.headers["content-type"] == "image/png"
    finally:
        service.close()
    import h5py

    with h5py.File(out, "r+") as f:  # the same store, not encoded with the flag
        del f.attrs["follow_links"]
    with EmbeddingStore.open(out) as store:
        assert stored_image_path(store, 0, linked_nih) is None


def test_every_data_command_offers_follow_links():
    import typer

    from cxrembed.cli import app

    group = typer.main.get_command(app)
    readers = {name: command for name, command in group.commands.items()
               if any("--dataset" in p.opts for p in command.params)}
    assert {"info", "encode", "cache", "adapt"} <= set(readers)
    for name, command in readers.items():
        assert any("--follow-links" in p.opts for p in command.params), name
