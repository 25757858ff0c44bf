"""The paper's few-shot head: its MLP trained on the shots alone (the encoder stays fixed).

Architecture: :class:`cxrembed.model.head.DiagnosisHead` (Linear 512-512, LayerNorm, GELU,
Dropout 0.3, Linear 512-256, LayerNorm, GELU, Dropout 0.2, Linear 256-14, Kaiming normal),
reused, not copied: its layers are read from the module and run as given. Trained with BCE
on logits, batch 16, AdamW, on the *raw* embeddings (the adapted head's input).
``init_state`` starts from the adapted run's head weights (the paper's protocol,
``--init adapted``); by default a seeded random init.

Not given by the paper's text and chosen here (every one is an option): AdamW lr 1e-3 and
weight decay 1e-2 (betas 0.9/0.999, as torch); at most 20 epochs; the epoch kept is the one
with the best mean AUC on the few-shot val sample (a real copy of its weights), with
patience 5; without a val sample the last epoch is kept.

Speed: :meth:`MLPHead.fit_many` trains several heads (the sweep: every seed of one shot
count) as one stacked model (:mod:`cxrembed.heads.mlp_train`): batched matrix products,
torch's AdamW kernel on each member's slice, work only for the members that have a batch
at a step. A member's training does not depend on who it is batched with (up to float
rounding of batched products). ``fit`` is ``fit_many`` with one member;
:meth:`MLPHead.predict_many` scores several heads on one input. ``device="cuda"`` runs
both on a GPU (random draws stay on the CPU generators, so a seed draws the same shuffles
and masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, ModelError
from cxrembed.heads.base import (build_config, check_known, check_xy, has_val, register_head,
                                 single_thread, torch_device)
from cxrembed.heads.mlp_train import _Stacked, _Trainer


@dataclass
class MLPConfig:
    epochs: int = 20
    batch_size: int = 16  # the paper's few-shot batch
    lr: float = 1e-3
    weight_decay: float = 1e-2  # the paper's AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    patience: int = 5  # epochs without a better val AUC before a member stops
    predict_batch: int = 8192  # rows x heads per forward pass at predict time (bounds memory)
    device: str = "cpu"  # torch device for training and prediction ("cuda", "cuda:1", ...)


@register_head("mlp")
class MLPHead:
    """The paper's MLP head trained on the shots (BCE, batch 16), epoch chosen on val."""

    input = "raw"

    def __init__(self, seed: int = 0, init_state: dict | None = None, **options: Any) -> None:
        self.config = build_config(MLPConfig, options, "mlp")
        if self.config.epochs < 1 or self.config.batch_size < 1:
            raise ConfigError(f"mlp needs epochs >= 1 and batch_size >= 1, got "
                              f"{self.config.epochs}, {self.config.batch_size}")
        self.seed = int(seed)
        self.init_state = init_state
        self.selected: dict[str, Any] = {}
        self.module = None

    def _build(self, in_dim: int, classes: int | None = None) -> Any:
        """The head, initialised from this head's seed (a fork of torch's global RNG)."""
        import torch

        from cxrembed.model.head import DiagnosisHead as PaperHead

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            module = PaperHead(in_dim=in_dim, **({"num_classes": classes} if classes else {}))
        if self.init_state is not None:
            try:
                module.load_state_dict(self.init_state, strict=True)
            except RuntimeError as exc:
                raise ModelError(f"the adapted head's weights do not fit the few-shot head "
                                 f"(input dim {in_dim}, {classes or 'default'} classes; an "
                                 "adapted head starts only a head of its own classes): "
                                 f"{str(exc).splitlines()[0]}") from None
        return module

    def fit(self, X: Any, Y: Any, X_val: Any = None, Y_val: Any = None, known: Any = None
            ) -> "MLPHead":
        """Train on the shots; keep the epoch with the best val mean AUC. ``known``:
        unknown labels are left out of the loss."""
        self.fit_many([self], [(X, Y, X_val, Y_val, known)])
        return self

    @classmethod
    def fit_many(cls, heads: list["MLPHead"], data: list[tuple[Any, Any, Any, Any]]
                 ) -> list["MLPHead"]:
        """Train ``heads[i]`` on ``data[i] = (X, Y, X_val, Y_val[, known])``, all at once;
        an unknown label (``known`` False) is left out of the loss."""
        import torch

        if len(heads) != len(data) or not heads:
            raise ConfigError("fit_many needs one (X, Y, X_val, Y_val) per head")
        config = heads[0].config
        if any(h.config != config for h in heads):
            raise ConfigError("fit_many trains heads of one configuration only")
        device = torch_device(config.device)
        members = []
        for head, (X, Y, X_val, Y_val, *known) in zip(heads, data):
            X, Y = check_xy(X, Y)
            mask = check_known(known[0] if known else None, Y)
            val = None
            if has_val(X_val, Y_val):
                X_val, Y_val = check_xy(X_val, Y_val, "X_val")
                val = (torch.from_numpy(X_val).to(device), Y_val)
            members.append((torch.from_numpy(X).to(device),
                            torch.from_numpy(Y.astype(np.float32)).to(device), val,
                            None if mask is None
                            else torch.from_numpy(mask.astype(np.float32)).to(device)))
        dims = {m[0].shape[1] for m in members}
        if len(dims) != 1:
            raise ConfigError(f"fit_many: heads see vectors of different sizes {sorted(dims)}")
        in_dim = dims.pop()
        classes = int(members[0][1].shape[1])
        modules = [h._build(in_dim, classes) for h in heads]
        with single_thread():  # a stream of tiny products: extra threads only cost here
            stack = _Stacked(modules, device)  # copies: the modules keep their init
            trainer = _Trainer(stack, members, [h.seed for h in heads], config)
            trainer.run()
        for i, (head, module) in enumerate(zip(heads, modules)):
            module.load_state_dict(trainer.member_state(i))
            module.eval()
            head.module = module
            head.selected = trainer.selected(i, head.init_state is not None)
        return heads

    def predict(self, X: Any) -> np.ndarray:
        """``(n, 14)`` logits."""
        return self.predict_many([self], X)[0]

    @classmethod
    def predict_many(cls, heads: list["MLPHead"], X: Any) -> list[np.ndarray]:
        """Every head's ``(n, 14)`` logits on the same ``X`` (checked and moved to the
        device once). Each head runs as its own module: measured against one stacked pass
        (the first layers as one wide product), this was faster on the CPU."""
        import torch

        if any(h.module is None for h in heads):
            raise ConfigError("mlp head: call fit before predict")
        X, _ = check_xy(X)
        config = heads[0].config
        device = torch_device(config.device)
        rows = config.predict_batch
        chunks = [torch.from_numpy(X[start:start + rows]).to(device)
                  for start in range(0, len(X), rows)]
        out = []
        with torch.no_grad():
            for head in heads:
                module = head.module.to(device)
                out.append(np.concatenate([module(x).double().cpu().numpy() for x in chunks]))
                head.module = module.cpu()
        return out
