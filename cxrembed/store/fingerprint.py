"""One encoder or two: vectors are comparable only when the encoder fingerprints of their
stores (or encoders) are equal, and :func:`check_same_encoder` refuses anything else."""

from __future__ import annotations

import json
from typing import Any

from cxrembed.errors import StoreError


def _fingerprint_of(thing: Any) -> dict:
    if isinstance(thing, dict):
        return thing
    fingerprint = getattr(thing, "fingerprint", None)
    if isinstance(fingerprint, dict):
        return fingerprint
    raise TypeError(f"cannot take an encoder fingerprint from {type(thing).__name__}")


def check_same_encoder(a: Any, b: Any, what: tuple[str, str] | None = None) -> None:
    """Refuse to compare vectors of two different encoders.

    ``a`` and ``b`` are stores, encoders or fingerprint dicts. Raises StoreError naming the
    fields that differ; returns None when the fingerprints are equal.
    """
    fa, fb = _fingerprint_of(a), _fingerprint_of(b)
    # Compare as JSON: tuples and lists, ints and floats spelled alike compare alike.
    ja = json.loads(json.dumps(fa, sort_keys=True, default=str))
    jb = json.loads(json.dumps(fb, sort_keys=True, default=str))
    if ja == jb:
        return
    names = what or (_describe(a), _describe(b))
    keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))
    diffs = "; ".join(f"{k}: {ja.get(k)!r} vs {jb.get(k)!r}" for k in keys[:5])
    raise StoreError(f"{names[0]} and {names[1]} come from different encoders ({diffs}); "
                     "their vectors are not comparable: encode both with the same model "
                     "and weights")


def _describe(thing: Any) -> str:
    from cxrembed.store.reader import EmbeddingStore

    if isinstance(thing, EmbeddingStore):
        return f"store {thing.path}"
    if isinstance(thing, dict):
        return f"fingerprint {thing.get('model', thing.get('model_name', '?'))}"
    return f"encoder {getattr(thing, 'model_name', type(thing).__name__)}"
