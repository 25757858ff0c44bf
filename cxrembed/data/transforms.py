"""Tensors for CLIP: normalisation and the paper's training augmentation, batched."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrembed.data.images import CLIP_MEAN, CLIP_STD


def to_clip_tensor(gray: np.ndarray | torch.Tensor, device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 gray (B×H×W or H×W) -> normalised float tensor (B×3×H×W or 3×H×W)."""
    t = torch.as_tensor(gray)
    if device is not None:
        t = t.to(device, non_blocking=True)
    single = t.ndim == 2
    if single:
        t = t[None]
    # One fused pass, (g / 255 - mean) / std == g * scale + shift per channel: 13.6 ms
    # instead of 24.3 ms for 64 images on this CPU.
    std = torch.tensor(CLIP_STD, device=t.device, dtype=dtype).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, device=t.device, dtype=dtype).view(1, 3, 1, 1)
    x = torch.addcmul(-mean / std, t.to(dtype)[:, None], 1.0 / (255.0 * std))
    return x[0] if single else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Apply CLIP mean/std to a B×3×H×W tensor in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class TrainAugment(torch.nn.Module):
    """The paper's augmentation, batched on tensors (each image gets its own draw).

    Horizontal flip p=0.5; affine rotation ±10°, translation ±10%, scale 0.9-1.1;
    brightness ±0.2, contrast ±0.2. The paper's saturation jitter (0.1) is kept as a
    parameter but changes nothing on a grayscale X-ray: saturation of a gray image is 0.

    Input: B×H×W uint8 (or B×1×H×W / B×3×H×W float in [0, 1]); output: B×3×H×W,
    CLIP-normalised.

    ``draw=(size, offset)``: the images are rows ``offset .. offset + B`` of a batch of
    ``size`` images spread over several processes; the random parameters are drawn for
    the whole batch and sliced, so an image is transformed as it would be in one process.
    """

    def __init__(self, hflip: float = 0.5, degrees: float = 10.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.1) -> None:
        super().__init__()
        self.hflip, self.degrees, self.translate = hflip, degrees, translate
        self.scale, self.brightness, self.contrast = scale, brightness, contrast
        self.saturation = saturation

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                draw: tuple[int, int] | None = None) -> torch.Tensor:
        x = images
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if x.ndim == 3:
            x = x[:, None]
        x = x[:, :1]  # gray: one channel until the end
        b, dev = x.shape[0], x.device
        size, offset = draw if draw is not None else (b, 0)

        def rand() -> torch.Tensor:
            return torch.rand(max(size, offset + b), generator=generator)[offset:offset + b]

        def uniform(low: float, high: float) -> torch.Tensor:
            return (low + (high - low) * rand()).to(dev)

        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        scale = uniform(*self.scale)
        tx, ty = uniform(-self.translate, self.translate), uniform(-self.translate, self.translate)
        flip = (rand() < self.hflip).to(dev)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
        # affine_grid maps output coordinates to input ones: the inverse transform,
        # with translation in [-1, 1] units (2 × the fraction of the size).
        theta = torch.stack([
            torch.stack([cos * sign, -sin, -2 * tx], dim=1),
            torch.stack([sin * sign, cos, -2 * ty], dim=1),
        ], dim=1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        bright = uniform(1 - self.brightness, 1 + self.brightness).view(b, 1, 1, 1).to(x.dtype)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1).to(x.dtype)
        x = (x * bright).clamp_(0, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean).clamp_(0, 1)
        return normalize(x.expand(-1, 3, -1, -1))
