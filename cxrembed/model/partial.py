"""Partial unfreezing of a CLIP ViT: the top N visual blocks, ``ln_post`` and ``proj``.

Everything else (patch embedding, class and position embeddings, ``ln_pre``, the lower
blocks, the whole text tower, ``logit_scale``) is frozen. The frozen part of the image
tower runs under ``torch.no_grad()`` in :func:`partial_image_features`, so no autograd
graph (and none of its activation memory) is built for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from cxrembed.errors import ConfigError, ModelError


def _vit(clip: nn.Module) -> nn.Module:
    visual = getattr(clip, "visual", clip)
    if not (hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks")
            and hasattr(visual, "ln_post") and hasattr(visual, "_embeds")):
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


def unfrozen_modules(clip: nn.Module, unfreeze: int) -> list[nn.Module | nn.Parameter]:
    """What trains: the top ``unfreeze`` blocks, ``ln_post`` and ``proj``."""
    check_unfreeze(clip, unfreeze)
    visual = _vit(clip)
    blocks = list(visual.transformer.resblocks)
    top = blocks[len(blocks) - unfreeze:] if unfreeze else []
    parts: list[nn.Module | nn.Parameter] = [*top, visual.ln_post]
    if visual.proj is not None:
        parts.append(visual.proj)
    return parts


def apply_partial_unfreeze(clip: nn.Module, unfreeze: int) -> list[nn.Parameter]:
    """Freeze all of ``clip`` except the top ``unfreeze`` visual blocks, ``ln_post`` and
    ``proj``; return the trainable parameters in a stable order."""
    parts = unfrozen_modules(clip, unfreeze)
    for p in clip.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for part in parts:
        params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        for p in params:
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


def trainable_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


def count_trainable(*modules: nn.Module) -> int:
    """Number of trainable scalars over the given modules (shared parameters once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def partial_image_features(clip: nn.Module, images: torch.Tensor, unfreeze: int) -> torch.Tensor:
    """``clip.encode_image(images)`` (unnormalised) with the frozen bottom under no_grad.

    The same values as open_clip's own forward (to float rounding: with autograd on,
    attention may take another kernel); only the autograd graph differs. ``unfreeze`` equal to the depth gives a normal forward (still with the stem
    frozen and graph-free).
    """
    visual = _vit(clip)
    blocks = visual.transformer.resblocks
    split = len(blocks) - unfreeze
    batch_first = getattr(visual.transformer, "batch_first", True)
    with torch.no_grad():
        x = visual._embeds(images)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:split]:
            x = block(x)
    for block in blocks[split:]:
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled
