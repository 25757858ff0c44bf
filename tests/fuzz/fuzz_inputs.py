"""Strategies for hostile outside input: CSV cells, CSV files, JSON values, file names."""

from __future__ import annotations

import csv
import io
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import strategies as st

from cxrembed.errors import CxrembedError

#: Cells a reader gives meaning to, and cells that have broken readers elsewhere.
CELLS = ["", " ", "1", "0", "-1", "1.0", "-1.0", "+1", "nan", "NaN", "x", "true", "2",
         "00000001_000.png", "00000002_000.png", "train/patient00001/study1/view1_frontal.jpg",
         "CheXpert-v1.0-small/valid/patient00002/study1/view1_frontal.jpg", "img/a.png",
         "../outside.png", "../../etc/passwd", "/etc/passwd", "C:\\x.png", "a/../../b.png",
         "train", "val", "valid", "validate", "test", "TRAIN", "PA", "AP", "L", "LATERAL",
         "M", "F", "Female", "58", "058Y", "-5", "1e400", "inf", "9" * 30, "['pneumonia']",
         "['normal']", "[", "[[[[[[[[[[", "['a', 1]", "{'a': 1}", "('x',)", "Atelectasis|Mass",
         "No Finding", "Effusion/Mass", "10000032", "50414267", "p10", '"', ",", "\n", "\t",
         "\x00", "\ufeff", "é", "∞", "\ud7ff"]
cell = st.one_of(st.sampled_from(CELLS), st.text(max_size=12))


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@st.composite
def csv_file(draw: Any, columns: tuple[str, ...], max_rows: int = 6) -> bytes:
    """The bytes of a CSV: usually the reader's own columns (some dropped, some added,
    shuffled) over hostile cells and ragged rows; sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    header = [c for c in columns if draw(st.integers(0, 7))]  # each kept 7 times in 8
    header += draw(st.lists(st.sampled_from(["extra", "Path", "Age", "Sex", ""]) | cell,
                            max_size=2))
    header = draw(st.permutations(header))
    width = len(header)
    rows = draw(st.lists(st.lists(cell, min_size=max(width - 1, 0), max_size=width + 1)
                         if draw(st.integers(0, 4)) == 0 else
                         st.lists(cell, min_size=width, max_size=width),
                         max_size=max_rows))
    text = csv_text(header, rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)

file_name = st.text(st.characters(exclude_characters="/\x00", codec="utf-8"),
                    min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is one per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="cxrembed-fuzz-") as name:
        yield Path(name)


def only_cxrembed_errors(call: Callable[[], Any]) -> Any:
    """Run ``call``: a result, or a CxrembedError (None); any other exception propagates
    to hypothesis, which shrinks it to the smallest input that raises it."""
    try:
        return call()
    except CxrembedError as exc:
        assert str(exc).strip(), "an error without a message"
        return None
