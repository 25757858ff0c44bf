"""Random draws made for the whole (global) batch, so that N processes train as one.

With ``torchrun``, each process takes a slice of every global batch. Randomness drawn per
process (dropout masks from each process's own generator) would give an image another
mask than the same image gets in a one-process run, and the two runs would drift apart.
Here every draw is made for the global batch, from a generator seeded by ``(seed,
epoch)`` and advanced identically on every rank, and each rank keeps the rows of its
slice: the masks an image gets do not depend on the number of processes. The
augmentation does the same (``TrainAugment(draw=...)``).

:func:`install` swaps each ``nn.Dropout`` of a model for a :class:`BatchDropout` (a
subclass: same ``p``, same behaviour in eval mode, nothing saved in a state dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BatchDraws:
    """The step's global batch size and where this rank's rows start in it."""

    generator: torch.Generator = field(default_factory=torch.Generator)
    size: int = 0  # rows of the global batch
    offset: int = 0  # first row of this rank's slice

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def step(self, size: int, offset: int) -> None:
        self.size, self.offset = size, offset

    def keep_mask(self, shape: torch.Size, p: float) -> torch.Tensor:
        """Bernoulli(1 - p) mask for this rank's ``shape[0]`` rows, drawn for the global
        batch (on the CPU: the same masks whatever the device)."""
        rows = shape[0]
        size = max(self.size, self.offset + rows)
        draw = torch.rand((size, *shape[1:]), generator=self.generator)
        return draw[self.offset:self.offset + rows] >= p


class BatchDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode mask comes from a shared :class:`BatchDraws`."""

    def __init__(self, p: float, draws: BatchDraws) -> None:
        super().__init__(p)
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        mask = self.draws.keep_mask(x.shape, self.p).to(device=x.device, dtype=x.dtype)
        return x * mask / (1 - self.p)


def install(model: nn.Module) -> BatchDraws:
    """Replace every ``nn.Dropout`` with ``p > 0`` in ``model`` by a :class:`BatchDropout`
    sharing one :class:`BatchDraws` (returned)."""
    draws = BatchDraws()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, BatchDropout(child.p, draws))
    return draws
