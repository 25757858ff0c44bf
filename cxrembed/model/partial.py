"""Partial unfreezing of a CLIP ViT: the top N visual blocks, ``ln_post`` and ``proj``.

Everything else (patch embedding, class and position embeddings, ``ln_pre``, the lower
blocks, the whole text tower, ``logit_scale``) is frozen, through open_clip's own
``VisionTransformer.lock(unlocked_groups=...)``. Its groups are, from the top: ``proj``;
the last block with ``ln_post``; each lower block; the stem. So ``unfreeze = N >= 1`` is
``lock(unlocked_groups=N + 1)`` exactly. ``unfreeze = 0`` (``ln_post`` and ``proj``
only) is the one case ``lock`` cannot express (``ln_post`` shares a group with the last
block): it is ``lock(unlocked_groups=1)`` plus ``ln_post``.

The frozen bottom builds no autograd graph without any special forward: its weights do not
require gradients and neither do the images, so autograd records nothing until the first
unfrozen block (and keeps none of the bottom's activations). The model's public
``encode_image`` is therefore the training forward too.
"""

from __future__ import annotations

from torch import nn

from cxrembed.errors import ConfigError, ModelError


def _vit(clip: nn.Module) -> nn.Module:
    visual = getattr(clip, "visual", clip)
    if not (hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks")
            and hasattr(visual, "ln_post") and callable(getattr(visual, "lock", None))):
        raise ModelError(f"partial unfreezing needs an open_clip VisionTransformer image tower; "
                         f"this model's is a {type(visual).__name__}. Use a ViT model "
                         "(e.g. ViT-B-32)")
    return visual


def visual_depth(clip: nn.Module) -> int:
    """Number of residual attention blocks in the image tower."""
    return len(_vit(clip).transformer.resblocks)


def check_unfreeze(clip: nn.Module, unfreeze: int) -> None:
    """Raise ConfigError unless ``0 <= unfreeze <= depth``."""
    depth = visual_depth(clip)
    if not 0 <= unfreeze <= depth:
        raise ConfigError(f"--unfreeze {unfreeze} is out of range: this image tower has {depth} "
                          f"blocks; use 0..{depth} (0 trains only ln_post and proj, {depth} "
                          "trains every block)")


def apply_partial_unfreeze(clip: nn.Module, unfreeze: int) -> list[nn.Parameter]:
    """Freeze all of ``clip`` except the top ``unfreeze`` visual blocks, ``ln_post`` and
    ``proj``; return the trainable parameters in the model's parameter order."""
    check_unfreeze(clip, unfreeze)
    visual = _vit(clip)
    for p in clip.parameters():  # the text tower and logit_scale: lock() covers only visual
        p.requires_grad_(False)
    visual.lock(unlocked_groups=unfreeze + 1 if unfreeze else 1)
    if unfreeze == 0:
        visual.ln_post.requires_grad_(True)
    return [p for p in clip.parameters() if p.requires_grad]


def count_trainable(*modules: nn.Module) -> int:
    """Number of trainable scalars over the given modules (shared parameters once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())
