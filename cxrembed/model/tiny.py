"""``cxr-tiny``: a CLIP small enough to train a full step on a laptop CPU in well under a
second, for tests and the demo.

Same shape of interface as ViT-B-32 where it matters to cxrembed: 224×224 input, patch 32
(7×7 tokens + class token), a 512-d joint space (so the paper's 512-512-256-14 head fits
unchanged), enough visual blocks (4) for the default ``--unfreeze 3`` to leave one frozen,
2 attention heads of width 32, average pooling, and a text tower with CLIP's tokenizer
(vocabulary 49,408) and 77-token context. Use it with ``pretrained="none"``; there are
no published weights.

The architecture is ``configs/cxr-tiny.json`` (package data), registered the way open_clip
registers its own: through its public ``add_model_config``.
"""

from __future__ import annotations

from pathlib import Path

TINY_NAME = "cxr-tiny"
#: The architecture file, shipped with the package.
TINY_CONFIG_FILE = Path(__file__).with_name("configs") / f"{TINY_NAME}.json"


def register_tiny() -> None:
    """Make ``open_clip.create_model("cxr-tiny")`` work (idempotent)."""
    import open_clip

    if TINY_NAME not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG_FILE)
