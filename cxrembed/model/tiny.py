"""``cxr-tiny``: a CLIP small enough to train a full step on a laptop CPU in well under a
second, for tests and the demo.

Same shape of interface as ViT-B-32 where it matters to cxrembed: 224×224 input, patch 32
(7×7 tokens + class token), a 512-d joint space (so the paper's 512-512-256-14 head fits
unchanged), enough visual blocks (4) for the default ``--unfreeze 3`` to leave one frozen,
and a text tower with CLIP's tokenizer and 77-token context. Use it with
``pretrained="none"``; there are no published weights.
"""

from __future__ import annotations

from copy import deepcopy

TINY_NAME = "cxr-tiny"

TINY_CONFIG: dict = {
    "embed_dim": 512,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 32,
        "width": 64,
        "layers": 4,
        "head_width": 32,  # 2 attention heads
        "mlp_ratio": 4.0,
        "pool_type": "avg",
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,  # CLIP's BPE vocabulary, so the real tokenizer works
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def register_tiny() -> None:
    """Make ``open_clip.create_model("cxr-tiny")`` work (idempotent).

    open_clip's public ``add_model_config`` only reads JSON files from disk; writing one at
    import time (or shipping it as package data) buys nothing over entering the dict in
    its registry directly, which is what ``add_model_config`` ends up doing.
    """
    from open_clip import factory

    if TINY_NAME not in factory._MODEL_CONFIGS:
        factory._MODEL_CONFIGS[TINY_NAME] = deepcopy(TINY_CONFIG)
