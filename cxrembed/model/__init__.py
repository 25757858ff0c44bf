"""open_clip loading (tag | local file | none), partial unfreezing, the paper's diagnosis head,
and the :class:`Encoder` every later stage uses.

Names are loaded on first use (PEP 562), so ``cxrembed.model.head`` (the few-shot MLP's
architecture) does not import open_clip, torchvision and timm (seconds of CPU): taking any
open_clip-facing name from this package registers the ``cxr-tiny`` architecture with
open_clip, as building a model through :mod:`cxrembed.model.loading` does too.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdaptedCLIP": "adapted", "load_adapted": "adapted", "read_adapted_meta": "adapted",
    "save_adapted": "adapted", "Encoder": "encoder", "load_encoder": "encoder",
    "DiagnosisHead": "head", "WeightsSource": "loading", "build_clip": "loading",
    "check_model_name": "loading", "create_clip": "loading", "list_model_names": "loading",
    "resolve_tag": "loading", "apply_partial_unfreeze": "partial", "check_unfreeze": "partial",
    "count_trainable": "partial", "visual_depth": "partial", "TINY_CONFIG_FILE": "tiny",
    "TINY_NAME": "tiny", "register_tiny": "tiny", "detect_quick_gelu": "weights",
    "read_weights": "weights",
}
_NO_OPEN_CLIP = {"head", "tiny"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    if _WHERE[name] not in _NO_OPEN_CLIP:
        from cxrembed.model.tiny import register_tiny

        register_tiny()
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
