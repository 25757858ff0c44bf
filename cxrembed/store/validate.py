"""Checking that a store's attributes and datasets agree before any row is read.

A store file comes from outside (copied, downloaded, written by another version or damaged):
its attributes may lie about its shape. Every claim a reader relies on (row count, vector
width, label columns, the ``rows_done`` counter, the JSON attributes' types) is checked
against the datasets themselves, so a lie is one StoreError naming the attribute and what
the file really holds, never an IndexError or a silently short read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrembed.errors import StoreError
from cxrembed.store.schema import JSON_ATTRS, LABEL_KNOWN, ROW_FIELDS

#: JSON attributes and the Python type each must decode to (None allowed: absent / "").
_JSON_TYPES = {"fingerprint": dict, "preprocessing": dict, "label_names": list,
               "dataset_sources": dict, "selection": dict, "load_args": dict,
               "head_label_names": list, "embedding_health": dict, "skipped_images": list,
               "search_centring": dict}


def _damaged(path: Any, what: str) -> StoreError:
    return StoreError(f"store {path} is damaged or was not written by cxrembed: {what}; "
                      "encode it again (`cxrembed encode ... --overwrite`)")


def _whole(attrs: dict[str, Any], key: str, path: Any, low: int) -> int:
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _damaged(path, f"attribute {key} is {value!r}, expected a whole number >= {low}")
    return value


def _names(attrs: dict[str, Any], key: str, path: Any) -> list[str] | None:
    names = attrs.get(key)
    if names is not None and not (isinstance(names, list) and names
                                  and all(isinstance(n, str) for n in names)):
        raise _damaged(path, f"attribute {key} is {str(names)[:80]}, expected a list of names")
    return names


def _shape(h5file: Any, name: str, want: tuple[int, ...], path: Any, why: str) -> None:
    import h5py

    obj = h5file.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise _damaged(path, f"it has no dataset {name!r}")
    if tuple(obj.shape) != want:
        raise _damaged(path, f"dataset {name!r} has shape {tuple(obj.shape)}, but {why} "
                             f"says {want}")


def check_store(h5file: Any, attrs: dict[str, Any], path: Any) -> int:
    """Raise StoreError unless the file's datasets are what its attributes say; return the
    number of final rows (``rows_done``)."""
    for key, kind in _JSON_TYPES.items():
        if key in JSON_ATTRS and attrs.get(key) is not None and not isinstance(attrs[key], kind):
            raise _damaged(path, f"attribute {key} is not a JSON {kind.__name__}")
    n = _whole(attrs, "num_rows", path, 0)
    dim = _whole(attrs, "embed_dim", path, 1)
    labels = _names(attrs, "label_names", path)
    head_labels = _names(attrs, "head_label_names", path)
    from cxrembed.labels import LABELS

    k = len(labels or LABELS)
    for name in ROW_FIELDS:
        width = (k,) if name == "labels" else ()
        _shape(h5file, name, (n,) + width, path, f"num_rows ({n})"
               + (f" with {k} label_names" if width else ""))
    if LABEL_KNOWN in h5file:
        _shape(h5file, LABEL_KNOWN, (n, k), path, f"num_rows ({n}) with {k} label_names")
    _shape(h5file, "embedding", (n, dim), path, f"num_rows ({n}) and embed_dim ({dim})")
    _shape(h5file, "embedding_norm", (n,), path, f"num_rows ({n})")
    if attrs.get("has_head"):
        _shape(h5file, "head_logits", (n, len(head_labels or LABELS)), path,
               f"num_rows ({n}) with its head_label_names")
    mean = attrs.get("embedding_mean")
    if mean is not None and (getattr(mean, "shape", None) != (dim,)
                             or getattr(mean, "dtype", np.dtype(object)).kind != "f"):
        raise _damaged(path, f"attribute embedding_mean has shape {getattr(mean, 'shape', '?')},"
                             f" expected ({dim},) floats")
    _shape(h5file, "rows_done", (1,), path, "the format")
    done = int(h5file["rows_done"][0])
    if not 0 <= done <= n:
        raise _damaged(path, f"rows_done is {done}, outside 0..num_rows ({n})")
    if attrs.get("complete") and done != n:
        raise _damaged(path, f"it is marked complete with {done} of {n} rows written")
    if attrs.get("has_text"):
        _check_text(h5file, dim, path)
    return done


def _check_text(h5file: Any, dim: int, path: Any) -> None:
    import json

    import h5py

    group = h5file.get("text")
    if not isinstance(group, h5py.Group) or "prompt" not in group or "embedding" not in group:
        raise _damaged(path, "has_text is set but it has no text/prompt and text/embedding")
    count = len(group["prompt"])
    _shape(h5file, "text/embedding", (count, dim), path,
           f"text/prompt ({count} prompts) with embed_dim ({dim})")
    try:
        prompts = json.loads(group.attrs["prompts"])
        ok = isinstance(prompts, dict) and all(
            isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(side, list) and all(isinstance(p, str) for p in side)
                for side in pair) for pair in prompts.values())
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _damaged(path, "its text prompts attribute is not {class: [[positive], "
                             "[negative]]}")
