"""The paper's few-shot head: its MLP trained on the shots alone (the encoder stays fixed).

Architecture: :class:`cxrembed.model.head.MLPHead` (Linear 512-512, LayerNorm, GELU,
Dropout 0.3, Linear 512-256, LayerNorm, GELU, Dropout 0.2, Linear 256-14, Kaiming normal),
reused, not copied: its layers are read from the module and run as given. Trained with BCE
on logits, batch 16, AdamW, on the *raw* embeddings (the adapted head's input).
``init_state`` starts from the adapted run's head weights (the paper's protocol,
``--init adapted``); by default a seeded random init.

Not given by the paper's text and chosen here (every one is an option): AdamW lr 1e-3 and
weight decay 1e-2 (betas 0.9/0.999, as torch); at most 20 epochs; the epoch kept is the one
with the best mean AUC on the few-shot val sample (a real copy of its weights), with
patience 5; without a val sample the last epoch is kept.

Speed: :meth:`MLPHead.fit_many` trains several heads (one per few-shot seed) as one
stacked model (batched matrix products), each member with its own data, initialisation,
shuffling and dropout stream, its own AdamW state and step count, and its own early stop:
a member's training does not depend on who it is batched with (up to float rounding of
batched products). ``fit`` is ``fit_many`` with one member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, ModelError
from cxrembed.heads.base import (build_config, check_known, check_xy, has_val, register_head,
                                 single_thread, val_mean_auc)


@dataclass
class MLPConfig:
    epochs: int = 20
    batch_size: int = 16  # the paper's few-shot batch
    lr: float = 1e-3
    weight_decay: float = 1e-2  # the paper's AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    patience: int = 5  # epochs without a better val AUC before a member stops
    predict_batch: int = 8192  # rows per forward pass at predict time (bounds memory)


class _Stacked:
    """Members' parameters stacked on a leading axis; the head's layers run functionally."""

    def __init__(self, modules: list[Any]) -> None:
        from torch import nn

        first = modules[0]
        if not isinstance(first, nn.Sequential) or list(first.buffers()):
            raise ModelError("the few-shot trainer runs an nn.Sequential head without buffers; "
                             f"got {type(first).__name__}")
        self.layers: list[tuple[str, Any, str]] = []
        for index, layer in enumerate(first):
            kind = type(layer).__name__
            if kind not in ("Linear", "LayerNorm", "GELU", "Dropout", "ReLU"):
                raise ModelError(f"the few-shot trainer does not know layer {kind}")
            self.layers.append((kind, layer, str(index)))
        # One leaf per member and parameter: members without a batch at a step get no
        # gradient, so torch's AdamW leaves them alone (no moment, decay or step count).
        self.leaves = {name: [m.get_parameter(name).detach().clone().requires_grad_(True)
                              for m in modules]
                       for name, _ in first.named_parameters()}

    def stacked(self, members: list[int]) -> dict[str, Any]:
        """The parameters of ``members`` stacked on a leading axis (differentiable)."""
        import torch

        return {name: torch.stack([leaves[i] for i in members])
                for name, leaves in self.leaves.items()}

    def forward(self, x: Any, dropout: Any = None, params: dict[str, Any] | None = None
                ) -> Any:
        """``x`` (S, B, D) -> logits (S, B, C) with ``params`` (default: all members);
        ``dropout(shape, p)`` gives keep masks (None: eval mode)."""
        import torch
        import torch.nn.functional as F

        p = params
        for kind, layer, index in self.layers:
            if kind == "Linear":
                x = torch.baddbmm(p[f"{index}.bias"].unsqueeze(1), x,
                                  p[f"{index}.weight"].transpose(1, 2))
            elif kind == "LayerNorm":
                x = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
                x = x * p[f"{index}.weight"].unsqueeze(1) + p[f"{index}.bias"].unsqueeze(1)
            elif kind == "GELU":
                x = F.gelu(x, approximate=layer.approximate)
            elif kind == "ReLU":
                x = F.relu(x)
            elif kind == "Dropout" and dropout is not None and layer.p > 0:
                x = x * dropout(x.shape, layer.p)
        return x

    def member_state(self, member: int) -> dict[str, Any]:
        return {name: leaves[member].detach().clone() for name, leaves in self.leaves.items()}


def _adamw(params: list[Any], config: MLPConfig) -> Any:
    """torch's AdamW, its fused CPU kernel where this torch has one (same maths)."""
    import torch

    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps,
                  weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


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

        from cxrembed.model.head import MLPHead as PaperHead

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
        members = []
        for head, (X, Y, X_val, Y_val, *known) in zip(heads, data):
            X, Y = check_xy(X, Y)
            mask = check_known(known[0] if known else None, Y)
            val = None
            if has_val(X_val, Y_val):
                val = check_xy(X_val, Y_val, "X_val")
            members.append((torch.from_numpy(X), torch.from_numpy(Y.astype(np.float32)), val,
                            None if mask is None else torch.from_numpy(mask.astype(np.float32))))
        dims = {m[0].shape[1] for m in members}
        if len(dims) != 1:
            raise ConfigError(f"fit_many: heads see vectors of different sizes {sorted(dims)}")
        in_dim = dims.pop()
        classes = int(members[0][1].shape[1])
        with single_thread():  # a stream of tiny products: extra threads only cost here
            stack = _Stacked([h._build(in_dim, classes) for h in heads])
            trainer = _Trainer(stack, members, [h.seed for h in heads], config)
            trainer.run()
        for i, head in enumerate(heads):
            module = head._build(in_dim, classes)
            module.load_state_dict(trainer.best_state[i] or stack.member_state(i))
            module.eval()
            head.module = module
            head.selected = trainer.selected(i, head.init_state is not None)
        return heads

    def predict(self, X: Any) -> np.ndarray:
        """``(n, 14)`` logits."""
        import torch

        if self.module is None:
            raise ConfigError("mlp head: call fit before predict")
        X, _ = check_xy(X)
        with torch.no_grad():
            parts = [self.module(torch.from_numpy(X[start:start + self.config.predict_batch]))
                     .double().numpy()
                     for start in range(0, len(X), self.config.predict_batch)]
        return np.concatenate(parts)


class _Trainer:
    """The epoch loop of :meth:`MLPHead.fit_many`: per-member batches, dropout streams,
    val checks and early stops."""

    def __init__(self, stack: _Stacked, members: list, seeds: list[int], config: MLPConfig):
        import torch

        self.stack, self.members, self.config = stack, members, config
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.optimiser = _adamw([leaf for leaves in stack.leaves.values() for leaf in leaves],
                                config)
        n = len(members)
        self.training = [True] * n
        self.best_auc: list[float | None] = [None] * n
        self.best_epoch = [0] * n
        self.best_state: list[dict | None] = [None] * n
        self.stale = [0] * n
        self.epochs_run = [0] * n

    def run(self) -> None:
        for epoch in range(1, self.config.epochs + 1):
            active = [i for i, on in enumerate(self.training) if on]
            if not active:
                break
            self._epoch(active)
            for i in active:
                self.epochs_run[i] = epoch
            self._validate(active, epoch)

    def _epoch(self, active: list[int]) -> None:
        import torch
        import torch.nn.functional as F

        size = self.config.batch_size
        orders = {i: torch.randperm(len(self.members[i][0]), generator=self.generators[i])
                  for i in active}
        steps = max(math.ceil(len(orders[i]) / size) for i in active)
        dim = self.members[0][0].shape[1]
        classes = self.members[0][1].shape[1]
        for step in range(steps):
            rows = {i: orders[i][step * size:(step + 1) * size] for i in active}
            rows = {i: r for i, r in rows.items() if len(r)}
            stepping = list(rows)  # members with a batch at this step
            width = max(len(r) for r in rows.values())
            x = torch.zeros(len(stepping), width, dim)
            y = torch.zeros(len(stepping), width, classes)
            weight = torch.zeros(len(stepping), width, classes)
            for j, i in enumerate(stepping):
                r = rows[i]
                x[j, :len(r)] = self.members[i][0][r]
                y[j, :len(r)] = self.members[i][1][r]
                weight[j, :len(r)] = 1.0 / (len(r) * classes)  # BCE mean over its own batch
                if self.members[i][3] is not None:  # unknown labels: out of the loss
                    weight[j, :len(r)] *= self.members[i][3][r]

            def dropout(shape: tuple, p: float) -> Any:
                keep = torch.ones(shape)
                for j, i in enumerate(stepping):  # each member draws from its own stream
                    r = len(rows[i])
                    keep[j, :r] = (torch.rand(r, shape[2], generator=self.generators[i])
                                   >= p) / (1 - p)
                return keep

            logits = self.stack.forward(x, dropout, self.stack.stacked(stepping))
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                    * weight).sum()
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()

    def _validate(self, active: list[int], epoch: int) -> None:
        import torch

        with torch.no_grad():
            for i in active:
                val = self.members[i][2]
                if val is None:
                    continue
                X_val, Y_val = val
                logits = self.stack.forward(torch.from_numpy(X_val).unsqueeze(0), None,
                                            self.stack.stacked([i]))
                auc = val_mean_auc(Y_val, logits[0].double().numpy())
                if not np.isnan(auc) and (self.best_auc[i] is None or auc > self.best_auc[i]):
                    self.best_auc[i], self.best_epoch[i], self.stale[i] = auc, epoch, 0
                    self.best_state[i] = self.stack.member_state(i)
                else:
                    self.stale[i] += 1
                    if self.stale[i] >= self.config.patience:
                        self.training[i] = False

    def selected(self, i: int, adapted_init: bool) -> dict[str, Any]:
        by_val = self.best_state[i] is not None
        return {"epoch": self.best_epoch[i] if by_val else self.epochs_run[i],
                "epochs_run": self.epochs_run[i], "by": "val" if by_val else "last",
                "val_mean_auc": None if self.best_auc[i] is None else float(self.best_auc[i]),
                "init": "adapted" if adapted_init else "random"}
