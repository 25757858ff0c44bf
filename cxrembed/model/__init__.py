"""open_clip loading (tag | local file | none), partial unfreezing, the paper's diagnosis head,
and the :class:`Encoder` every later stage uses.

Importing this package registers the ``cxr-tiny`` architecture with open_clip.
"""

from cxrembed.model.adapted import (AdaptedCLIP, load_adapted, read_adapted_meta,
                                    save_adapted)
from cxrembed.model.encoder import Encoder, load_encoder
from cxrembed.model.head import DiagnosisHead
from cxrembed.model.loading import (WeightsSource, build_clip, check_model_name, create_clip,
                                    list_model_names, resolve_tag)
from cxrembed.model.partial import (apply_partial_unfreeze, check_unfreeze, count_trainable,
                                    visual_depth)
from cxrembed.model.tiny import TINY_CONFIG_FILE, TINY_NAME, register_tiny
from cxrembed.model.weights import detect_quick_gelu, read_weights

register_tiny()

__all__ = [
    "AdaptedCLIP", "Encoder", "DiagnosisHead", "TINY_CONFIG_FILE", "TINY_NAME", "WeightsSource",
    "apply_partial_unfreeze", "build_clip", "check_model_name", "check_unfreeze",
    "count_trainable", "create_clip", "detect_quick_gelu", "list_model_names", "load_adapted",
    "load_encoder", "read_adapted_meta", "read_weights",
    "register_tiny", "resolve_tag", "save_adapted", "visual_depth",
]
