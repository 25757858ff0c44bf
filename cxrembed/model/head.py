"""The paper's multi-label diagnosis head on CLIP's 512-d joint-space image embedding.

It is trained with the encoder by ``cxrembed adapt``; :class:`cxrembed.heads.mlp.MLPHead`
is the few-shot trainer that fits this same architecture on stored vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrembed.labels import NUM_CLASSES


class DiagnosisHead(nn.Sequential):
    """Linear 512-512, LayerNorm, GELU, Dropout 0.3, Linear 512-256, LayerNorm, GELU,
    Dropout 0.2, Linear 256-14; Linear layers Kaiming-normal initialised, biases zero.

    399,118 parameters at the defaults. It takes the embedding *before* L2
    normalisation (the paper feeds ``encode_image`` output straight in) and returns
    one logit per class, in :data:`cxrembed.labels.LABELS` order.
    """

    def __init__(self, in_dim: int = 512, hidden: tuple[int, int] = (512, 256),
                 num_classes: int = NUM_CLASSES, dropout: tuple[float, float] = (0.3, 0.2)
                 ) -> None:
        h1, h2 = hidden
        super().__init__(
            nn.Linear(in_dim, h1), nn.LayerNorm(h1), nn.GELU(), nn.Dropout(dropout[0]),
            nn.Linear(h1, h2), nn.LayerNorm(h2), nn.GELU(), nn.Dropout(dropout[1]),
            nn.Linear(h2, num_classes),
        )
        self.in_dim, self.num_classes = in_dim, num_classes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan-in, ReLU gain: GELU's closest match) on every Linear."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return super().forward(embedding)


#: The former name, kept while ``cxrembed.heads.mlp`` still imports it (another helper's
#: file); not exported by :mod:`cxrembed.model`. Use :class:`DiagnosisHead`.
