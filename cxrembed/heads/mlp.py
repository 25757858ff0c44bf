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

Speed: :meth:`MLPHead.fit_many` trains several heads (one per few-shot seed) as one
stacked model: one tensor per parameter with the members on its first axis, batched
matrix products, and torch's AdamW maths applied to the stacked tensors (no per-member
copies at each step). Each member has its own data, initialisation, shuffling and dropout
stream, its own AdamW state and step count, and its own early stop: a member's training
does not depend on who it is batched with (up to float rounding of batched products).
``fit`` is ``fit_many`` with one member; :meth:`MLPHead.predict_many` scores several heads
on one input. ``device="cuda"`` runs both on a GPU
(random draws stay on the CPU generators, so a seed draws the same shuffles and masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError, ModelError
from cxrembed.heads.base import (build_config, check_known, check_xy, has_val, register_head,
                                 single_thread, torch_device, val_mean_auc)


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


class _Stacked:
    """Members' parameters stacked on a leading axis (one leaf per parameter); the head's
    layers run functionally on them with batched matrix products.

    A Linear weight is kept transposed, ``(S, in, out)``: ``x @ W`` then needs no
    transposed view, whose gradient torch would have to copy back into the weight's
    layout at every step (measured: a training step 1.6-3x faster). AdamW is elementwise,
    so the layout changes nothing in its maths; :meth:`member_state` gives torch's layout.
    """

    def __init__(self, modules: list[Any], device: Any = "cpu") -> None:
        import torch
        from torch import nn

        first = modules[0]
        if not isinstance(first, nn.Sequential) or list(first.buffers()):
            raise ModelError("the few-shot trainer runs an nn.Sequential head without buffers; "
                             f"got {type(first).__name__}")
        self.layers: list[tuple[str, Any, str]] = []
        self.transposed: set[str] = set()
        for index, layer in enumerate(first):
            kind = type(layer).__name__
            if kind not in ("Linear", "LayerNorm", "GELU", "Dropout", "ReLU"):
                raise ModelError(f"the few-shot trainer does not know layer {kind}")
            self.layers.append((kind, layer, str(index)))
            if kind == "Linear":
                self.transposed.add(f"{index}.weight")
        with torch.no_grad():
            self.params = {}
            for name, _ in first.named_parameters():
                stacked = torch.stack([m.get_parameter(name).detach() for m in modules])
                if name in self.transposed:
                    stacked = stacked.transpose(1, 2)
                self.params[name] = stacked.contiguous().to(device).requires_grad_(True)

    def forward(self, x: Any, dropout: Any = None, params: dict[str, Any] | None = None
                ) -> Any:
        """``x`` (S, B, D) -> logits (S, B, C) with ``params`` (default: all members);
        ``dropout(shape, p)`` gives keep masks (None: eval mode)."""
        import torch
        import torch.nn.functional as F

        p = self.params if params is None else params
        for kind, layer, index in self.layers:
            if kind == "Linear":
                x = torch.baddbmm(p[f"{index}.bias"].unsqueeze(1), x, p[f"{index}.weight"])
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

    def member_state(self, i: int) -> dict[str, Any]:
        """Member ``i``'s parameters as a CPU state dict in torch's layout."""
        return {name: (p[i].detach().t() if name in self.transposed else p[i].detach())
                .to("cpu", copy=True).contiguous() for name, p in self.params.items()}


class _AdamW:
    """torch's AdamW (its fused kernel where this torch has one) on stacked parameters,
    stepping only the members given: each member's slice of each parameter has its own
    moments and step count, as if it were its own parameter in torch.optim.AdamW (a member
    without a batch at a step gets no decay, no moment update and no step). The members'
    slices are views (unbound once), so the kernel updates the stacked tensors in place."""

    def __init__(self, params: dict[str, Any], config: MLPConfig) -> None:
        import torch

        self.params, self.config = params, config
        members = next(iter(params.values())).shape[0]
        self.views = {n: p.detach().unbind(0) for n, p in params.items()}
        self.exp_avg = {n: torch.zeros_like(p).unbind(0) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p).unbind(0) for n, p in params.items()}
        self.steps = {n: [torch.zeros((), device=p.device) for _ in range(members)]
                      for n, p in params.items()}
        self.fused: bool | None = True

    def step(self, members: list[int]) -> None:
        import torch
        from torch.optim.adam import adam  # torch's functional Adam(W)

        lists: tuple[list, ...] = ([], [], [], [], [])
        for name, param in self.params.items():
            grads = param.grad.unbind(0)
            for out, items in zip(lists, (self.views[name], grads, self.exp_avg[name],
                                          self.exp_avg_sq[name], self.steps[name])):
                out.extend(items[i] for i in members)
        c = self.config
        kwargs = dict(amsgrad=False, beta1=c.betas[0], beta2=c.betas[1], lr=c.lr,
                      weight_decay=c.weight_decay, eps=c.eps, maximize=False,
                      decoupled_weight_decay=True)
        with torch.no_grad():
            if self.fused:
                try:
                    adam(*lists[:4], [], lists[4], fused=True, **kwargs)
                    return
                except (RuntimeError, TypeError, ValueError):  # no fused kernel here
                    self.fused = False
            adam(*lists[:4], [], lists[4], foreach=True, **kwargs)


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
            module.load_state_dict(trainer.best_state[i] or stack.member_state(i))
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


class _Trainer:
    """The epoch loop of :meth:`MLPHead.fit_many`: per-member batches, dropout streams,
    val checks and early stops. Random draws (shuffles, dropout masks) come from each
    member's own CPU generator, so a member's run does not depend on its batch-mates or
    on the device.

    The members' shots are kept padded in one ``(S, N + 1, D)`` tensor whose last row is
    zeros: a step gathers every member's batch with one index (a member without a batch
    reads the zero row, with zero loss weight: zero gradient, and it takes no step).
    """

    def __init__(self, stack: _Stacked, members: list, seeds: list[int], config: MLPConfig):
        import torch

        self.stack, self.config = stack, config
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.optimiser = _AdamW(stack.params, config)
        n = len(members)
        self.sizes = [len(m[0]) for m in members]
        self.x, self.y, self.known = _padded(
            [m[0] for m in members], [m[1] for m in members],
            [m[3] if m[3] is not None else torch.ones_like(m[1]) for m in members])
        self.val = [m[2] for m in members]
        no_val = members[0][0][:0]  # (0, D): a member without a val sample
        self.x_val = _padded([v[0] if v is not None else no_val for v in self.val])[0]
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
        n_members, pad = self.x.shape[0], self.x.shape[1] - 1  # row ``pad``: zeros
        steps = max(math.ceil(self.sizes[i] / size) for i in active)
        order = torch.full((n_members, steps * size), pad, dtype=torch.long)
        for i in active:
            order[i, :self.sizes[i]] = torch.randperm(self.sizes[i],
                                                      generator=self.generators[i])
        order = order.to(self.x.device)
        members = torch.arange(n_members, device=self.x.device)[:, None]
        classes = self.y.shape[2]
        for step in range(steps):
            counts = [max(0, min(size, self.sizes[i] - step * size)) if i in active else 0
                      for i in range(n_members)]
            stepping = [i for i, r in enumerate(counts) if r]
            width = max(counts)
            rows = order[:, step * size:step * size + width]
            x, y = self.x[members, rows], self.y[members, rows]
            # BCE mean over each member's own batch; unknown labels and padding: weight 0
            share = torch.tensor([1.0 / (r * classes) if r else 0.0 for r in counts],
                                 device=x.device)
            weight = self.known[members, rows] * share[:, None, None]

            def dropout(shape: tuple, p: float) -> Any:
                keep = torch.ones(shape[0], shape[1], shape[2])
                for i in stepping:  # each member draws from its own stream
                    keep[i, :counts[i]] = (torch.rand(counts[i], shape[2],
                                                      generator=self.generators[i]) >= p
                                           ) / (1 - p)
                return keep.to(x.device)

            logits = self.stack.forward(x, dropout)
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                    * weight).sum()
            for param in self.stack.params.values():
                param.grad = None
            loss.backward()
            self.optimiser.step(stepping)

    def _validate(self, active: list[int], epoch: int) -> None:
        import torch

        checked = [i for i in active if self.val[i] is not None]
        if not checked:
            return
        with torch.no_grad():  # every member's val sample in one batched pass
            logits = self.stack.forward(self.x_val).double().cpu().numpy()
        for i in checked:
            y_val = self.val[i][1]
            auc = val_mean_auc(y_val, logits[i, :len(y_val)])
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


def _padded(*groups: list[Any]) -> list[Any]:
    """Each group's ``(n_i, ...)`` tensors stacked to ``(S, max n_i + 1, ...)``, zero-padded
    (the last row is always zeros)."""
    import torch

    out = []
    for tensors in groups:
        longest = max(len(t) for t in tensors)
        padded = torch.zeros((len(tensors), longest + 1, *tensors[0].shape[1:]),
                             dtype=tensors[0].dtype, device=tensors[0].device)
        for i, t in enumerate(tensors):
            padded[i, :len(t)] = t
        out.append(padded)
    return out
