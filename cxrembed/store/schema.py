"""The HDF5 embedding store, format version 2: one file per (dataset, encoder) pair.

Layout of ``STORE.h5`` (N images, D = the encoder's joint-space dimension)::

    attrs
      format            "cxrembed.store"
      format_version    2 (readers read 1 and 2 and refuse any other: see "Versions")
      cxrembed_version  the package version that wrote the file
      uuid              random id of this store; the FAISS index beside it records it
      created           ISO-8601 UTC time the encode started
      finished          ISO-8601 UTC time the complete flag was set ("" until then)
      complete          False until every row is written; set last
      num_rows          N
      embed_dim         D
      model_name        the encoder's architecture (``ViT-B-32``, ``cxr-tiny``)
      weights_source    where its weights came from (tag, file, ``none``, adapted run)
      weights_sha256    hash of that weights file ("" when none)
      fingerprint       JSON: the encoder's fingerprint; equal <=> same encoder
      preprocessing     JSON: how pixels were decoded and normalised
      run               the adapted run the encoder came from ("" for a frozen CLIP)
      load_args         JSON: ``load_encoder`` keyword arguments that load the encoder
                        again (queries by image or new text use it)
      has_head          the adapted head's logits are stored
      has_text          the encoder has a text tower (text queries, zero-shot)
      label_names       JSON: the dataset's class names (NIH's 14, CheXpert's 13, ...), the
                        column order of ``labels``
      head_label_names  JSON: the adapted head's class names, the column order of
                        ``head_logits`` (only when ``has_head``; NIH's 14 for an NIH run)
      dataset           the reader that read the data (``nih``, ``chexpert``, ...)
      batch_size        the batch size of the encode (a resume reuses it, so its batches,
      chunk_rows        and hence its vectors, are those of an uninterrupted run)
      dataset_root      the data folder encoded (for montages); ``image_path`` is relative to it
      dataset_sources   JSON: the metadata and split files it was read from
      follow_links      True when read with ``--follow-links`` (absent otherwise): montages
                        and serve's thumbnails then read its images through links inside
                        ``dataset_root`` that lead out of it
      selection         JSON: the ``splits`` and ``limit`` asked for
      embedding_health  JSON (set when complete): ``mean_cosine`` (mean pairwise cosine of
                        a seeded sample of rows), ``effective_rank`` (exp of the entropy
                        of the normalised singular values of the centred sample),
                        ``sample_size``, ``seed``, ``collapsed`` (mean_cosine > 0.95)
      embedding_mean    float32 (D,) (set when complete): the mean of the unit vectors of
                        every row, subtracted by centred search (:mod:`.centring`)
      search_centring   JSON (set when complete): the figure that decides whether search
                        centres (``raw``, ``centred``, ``difference``, ``stderr``,
                        ``queries``, ``centre``, ``why``; see :mod:`.centring`)
      skipped_images    JSON (set when complete): ``[{"image_id", "reason"}]``, images of
                        the selection left out (``--skip-bad``, or gone when resumed)

    per image, row-aligned, written once when the store is created
      image_id    S  (N,)      file name, ``00000001_000.png``
      patient_id  i8 (N,)
      follow_up   i8 (N,)
      split       S  (N,)      ``train`` / ``val`` / ``test``
      view        S  (N,)      ``PA`` / ``AP``
      sex         S  (N,)      ``M`` / ``F``
      age         f4 (N,)      NaN where unknown
      labels      u1 (N, K)    multi-hot, columns in ``label_names`` order
      label_known u1 (N, K)    0 where a label is unknown (e.g. CheXpert's uncertain under
                               ``--uncertain ignore``): left out of AUCs and losses. Stores
                               written before it existed read as all known.
      image_path  S  (N,)      UTF-8 image path relative to ``dataset_root``

    per image, filled in chunks by the encode
      embedding       f2 (N, D)   the encoder's output in CLIP's joint space, *not*
                                  normalised (the adapted head's input, what few-shot heads
                                  train on)
      embedding_norm  f4 (N,)     L2 norm of each stored float16 row: the unit vector used
                                  for similarity is ``embedding / embedding_norm``
      head_logits     f4 (N, H)   the adapted head's logits (only when ``has_head``), columns
                                  in ``head_label_names`` order
      rows_done       i8 (1,)     rows 0 .. rows_done-1 are final

    text (only when ``has_text``)
      text/prompt     str (P,)    every prompt, each once
      text/embedding  f4 (P, D)   its text embedding, not normalised
      text attrs      prompts: JSON {class: [[positive prompts], [negative prompts]]},
                      ``No Finding`` included

Crash safety: every dataset is allocated (contiguous, early allocation) when the file is
created and flushed, so an encode afterwards writes raw bytes only: a chunk's rows, a
flush, then ``rows_done``, then a flush. A process killed at any point (``kill -9``) or a
write failing with a full disk leaves a file whose first ``rows_done`` rows are final and
whose metadata was never touched; ``--resume`` continues from there. ``complete`` (with ``finished`` and
``embedding_health``) is written after creation, last.

Skipped images (``encode --skip-bad``, or images gone from the dataset when an encode is
resumed) keep zero rows until the end: their rows and reasons are listed in
``STORE.h5.skipped.json`` (written before ``rows_done`` passes them), and when every row
is written the store is copied without them (:mod:`cxrembed.store.compact`) and the list
moves to the ``skipped_images`` attribute.

Versions: 1 is the layout above without ``embedding_mean`` and ``search_centring``
(cxrembed 0.x stores up to this session; the earliest of them also lack ``label_known``,
``head_label_names`` and ``dataset``, read as all known / NIH's 14 / ``nih``). 2 adds those
two attributes, set when the store is complete, for centred search. Nothing else changed
(the rows, their dtypes and the crash-safe write order are the same), so version 1 is read
as it is, with no migration: search leaves a store without the recorded mean uncentred
under ``--centre auto`` and computes the mean at open under ``--centre on``
(:mod:`cxrembed.store.centring`), and an unfinished version-1 store resumed by this
cxrembed is finished as version 2 (the encode's ``finish`` writes version 2's attributes).
A version above 2 is refused by name: it may store rows differently, and reading it as 2
could return wrong vectors silently.

Writers: one at a time per store, held by ``STORE.h5.lock`` beside it (not part of the file;
:mod:`cxrembed.store.lock`). Readers refuse a store another process is writing, or, asked
for an incomplete store, read only its final rows (``rows_done``). A store's attributes are
checked against its datasets when it is opened (:mod:`cxrembed.store.validate`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

FORMAT = "cxrembed.store"
#: The version this cxrembed writes, and those it reads (see "Versions" above).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: Row-aligned metadata datasets and their on-disk dtypes ("S" = UTF-8 bytes).
ROW_FIELDS: dict[str, str] = {
    "image_id": "S",
    "patient_id": "i8",
    "follow_up": "i8",
    "split": "S",
    "view": "S",
    "sex": "S",
    "age": "f4",
    "labels": "u1",
    "image_path": "S",
}
#: The row-aligned mask of known labels (u1, N x K); a store written by an earlier cxrembed
#: lacks it and reads as all known.
LABEL_KNOWN = "label_known"
#: Attributes stored as JSON strings (decoded by the reader).
JSON_ATTRS = ("fingerprint", "preprocessing", "label_names", "dataset_sources", "selection",
              "load_args", "head_label_names", "embedding_health", "skipped_images",
              "search_centring")
NO_FINDING_KEY = "No Finding"


def encode_strings(values: np.ndarray) -> np.ndarray:
    """Python / numpy strings -> fixed-width UTF-8 bytes (HDF5 fixed-length strings)."""
    values = np.asarray(values, dtype=str)
    if values.size == 0:
        return np.zeros(values.shape, dtype="S1")
    return np.char.encode(values, "utf-8")


def decode_strings(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_strings`: a numpy ``str`` array."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8", errors="replace")
    return values.astype(str)


def attr_value(value: Any) -> Any:
    """Decode an HDF5 attribute to plain Python (bytes -> str, numpy scalars -> Python)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(h5attrs: Any) -> dict[str, Any]:
    """All attributes of a store file as plain Python, JSON ones parsed."""
    out = {}
    for key, value in h5attrs.items():
        value = attr_value(value)
        if key in JSON_ATTRS and isinstance(value, str):
            try:
                value = json.loads(value) if value else None
            except ValueError:
                from cxrembed.errors import StoreError

                raise StoreError(f"store attribute {key} is not valid JSON ({value[:60]!r}); "
                                 "the file is damaged: encode it again") from None
        out[key] = value
    return out
