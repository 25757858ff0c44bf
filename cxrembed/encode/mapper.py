"""Mapper: a batch of uint8 pixels -> joint-space vectors (and the adapted head's logits)."""

from __future__ import annotations

from typing import Any

import numpy as np


class ClipMapper:
    """Normalise on the model's device (float32, outside autocast's reach), encode under
    bf16 autocast on CUDA, return float32 numpy arrays."""

    def __init__(self, encoder: Any) -> None:
        import torch

        self.encoder = encoder
        self.device = getattr(encoder, "device", "cpu")
        self.cuda = torch.device(self.device).type == "cuda"
        self.has_head = bool(encoder.has_head)

    def __call__(self, pixels: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 ``(b, S, S)`` -> float32 ``(b, D)`` vectors and ``(b, C)`` logits or None."""
        import torch

        from cxrembed.data.transforms import to_clip_tensor

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                     enabled=self.cuda):
            x = to_clip_tensor(pixels, device=self.device)
            emb = self.encoder.encode_image(x)
            logits = self.encoder.head_logits(emb) if self.has_head else None
        return (emb.float().cpu().numpy(),
                None if logits is None else logits.float().cpu().numpy())


def encode_texts(encoder: Any, prompts: list[str], batch: int = 256) -> np.ndarray:
    """float32 ``(P, D)`` text embeddings, not normalised."""
    import torch

    parts = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            parts.append(encoder.encode_text(prompts[i:i + batch]).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, encoder.embed_dim), np.float32)
