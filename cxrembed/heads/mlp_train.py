"""Training many few-shot MLP heads at once (:meth:`cxrembed.heads.mlp.MLPHead.fit_many`).

The members' parameters are stacked on a leading axis (one tensor per parameter), the
head's layers run on them with batched matrix products, and torch's AdamW kernel updates
each member's slice in place. Each member has its own data, initialisation, shuffling and
dropout stream (its own CPU generator), AdamW state and step count, and early stop: its
training does not depend on who it is batched with (up to float rounding of batched
products).

Work is done only for the members that have a batch at a step. Members sit in *slots*:
the active ones first, each group ordered by sample size, largest first. At step ``s`` of
an epoch the members with a batch are those with more than ``s * batch`` shots, so they
are always a prefix of the slots, and the step runs on views of that prefix (no copies,
no zero-weight work for members that have finished their epoch or stopped). When a member
stops early, the stack is reordered once so that the active ones stay in front. The sweep
calls it once per shot count, with that count's seeds, whose samples differ in size (one
seed's draw may hold more rows than another's). It would also train several shot counts'
members in one call; measured on the NIH-size sweep, that was slower (15.9 s against
14.5 s of CPU for the 50 heads; benchmarks/RESULTS.md, fewshot), so the sweep does not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxrembed.errors import ModelError
from cxrembed.heads.base import val_mean_aucs_each


class _Stacked:
    """Members' parameters stacked on a leading axis; the head's layers run functionally on
    them with batched matrix products.

    A Linear weight is kept transposed, ``(S, in, out)``: ``x @ W`` then needs no
    transposed view, whose gradient torch would have to copy back into the weight's
    layout at every step (measured: a training step 1.6-3x faster). AdamW is elementwise,
    so the layout changes nothing in its maths; :meth:`torch_layout` gives torch's layout.
    The stacked tensors do not require gradients: a step makes leaves of the prefix it
    trains (:meth:`leaves`), views of the same storage.
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
                self.params[name] = stacked.contiguous().to(device)

    def forward(self, x: Any, params: dict[str, Any], dropout: Any = None) -> Any:
        """``x`` (k, B, D) -> logits (k, B, C) with ``params`` (k members' tensors);
        ``dropout(shape, p)`` gives keep masks (None: eval mode)."""
        import torch
        import torch.nn.functional as F

        p = params
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

    def prefix(self, k: int) -> dict[str, Any]:
        """The first ``k`` slots' parameters (views)."""
        return {name: p[:k] for name, p in self.params.items()}

    def leaves(self, k: int) -> dict[str, Any]:
        """The first ``k`` slots' parameters as autograd leaves (views of the stack)."""
        return {name: p[:k].requires_grad_(True) for name, p in self.params.items()}

    def reorder(self, order: Any) -> None:
        """Slot ``j`` takes what slot ``order[j]`` held."""
        self.params = {name: p[order].contiguous() for name, p in self.params.items()}

    def torch_layout(self, tensors: dict[str, Any], i: int) -> dict[str, Any]:
        """Row ``i`` of stacked ``tensors`` as a CPU state dict in torch's layout."""
        return {name: (t[i].t() if name in self.transposed else t[i])
                .to("cpu").contiguous().clone() for name, t in tensors.items()}


class _AdamW:
    """torch's AdamW (its fused kernel where this torch has one) on stacked parameters,
    stepping only the slots given: each slot's slice of each parameter has its own moments
    and step count, as if it were its own parameter in torch.optim.AdamW (a slot without a
    batch at a step gets no decay, no moment update and no step). The slices are views
    (unbound once per layout), so the kernel updates the stacked tensors in place."""

    def __init__(self, params: dict[str, Any], config: Any) -> None:
        import torch

        self.config = config
        members = next(iter(params.values())).shape[0]
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        self.steps = {n: [torch.zeros((), device=p.device) for _ in range(members)]
                      for n, p in params.items()}
        self.fused: bool | None = True
        self.bind(params)

    def bind(self, params: dict[str, Any]) -> None:
        """Take (new) stacked parameter tensors of the same shapes, in the same slots."""
        self.params = params
        self.views = {n: (p.detach().unbind(0), self.exp_avg[n].unbind(0),
                          self.exp_avg_sq[n].unbind(0), self.steps[n]) for n, p in params.items()}

    def reorder(self, params: dict[str, Any], order: Any) -> None:
        """Move the state with the parameters (:meth:`_Stacked.reorder` with ``order``)."""
        self.exp_avg = {n: t[order].contiguous() for n, t in self.exp_avg.items()}
        self.exp_avg_sq = {n: t[order].contiguous() for n, t in self.exp_avg_sq.items()}
        self.steps = {n: [s[int(j)] for j in order] for n, s in self.steps.items()}
        self.bind(params)

    def step(self, slots: list[int], grads: dict[str, Any]) -> None:
        """One AdamW step for ``slots``; ``grads[name][j]`` is slot ``slots[j]``'s gradient."""
        import torch
        from torch.optim.adamw import adamw  # torch's functional AdamW

        lists: tuple[list, ...] = ([], [], [], [], [])
        for name, views in self.views.items():
            lists[1].extend(grads[name].unbind(0))
            for out, items in zip((lists[0], lists[2], lists[3], lists[4]), views):
                out.extend(items[i] for i in slots)
        c = self.config
        kwargs = dict(amsgrad=False, beta1=c.betas[0], beta2=c.betas[1], lr=c.lr,
                      weight_decay=c.weight_decay, eps=c.eps, maximize=False)
        with torch.no_grad():
            if self.fused:
                try:
                    adamw(*lists[:4], [], lists[4], fused=True, **kwargs)
                    return
                except (RuntimeError, TypeError, ValueError):  # no fused kernel here
                    self.fused = False
            adamw(*lists[:4], [], lists[4], foreach=True, **kwargs)


class _Trainer:
    """The epoch loop: per-member batches, dropout streams, val checks and early stops,
    work only for the prefix of slots that has a batch (see the module's docstring).
    Random draws (shuffles, dropout masks) come from each member's own CPU generator, in
    the order a member alone would draw them, so a member's run does not depend on its
    batch-mates or on the device.

    The members' shots are kept padded in one ``(S, N + 1, D)`` tensor (member order)
    whose last row is zeros: a member's last, shorter batch reads zero rows with zero
    loss weight (zero gradient).
    """

    def __init__(self, stack: _Stacked, members: list, seeds: list[int], config: Any):
        import torch

        self.stack, self.config = stack, config
        n = len(members)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.sizes = [len(m[0]) for m in members]
        #: member held by each slot: largest samples first (stable), see the module doc
        self.slots = sorted(range(n), key=lambda i: -self.sizes[i])
        self._reorder(self.slots, first=True)
        self.x, self.y, self.known = _padded(
            [m[0] for m in members], [m[1] for m in members],
            [m[3] if m[3] is not None else torch.ones_like(m[1]) for m in members])
        self.val = [m[2] for m in members]
        no_val = members[0][0][:0]  # (0, D): a member without a val sample
        self.x_val = _padded([v[0] if v is not None else no_val for v in self.val])[0]
        self.training = [True] * n
        self.best_auc: list[float | None] = [None] * n
        self.best_epoch = [0] * n
        #: each member's best weights so far, stacked in member order (stack layout)
        self.best = {name: torch.zeros_like(p) for name, p in stack.params.items()}
        self.has_best = [False] * n
        self.stale = [0] * n
        self.epochs_run = [0] * n

    def _reorder(self, slots: list[int], first: bool = False) -> None:
        """Put member ``slots[j]`` in slot ``j`` (stack and AdamW state alike)."""
        import torch

        if first:
            order = torch.tensor(slots, device=next(iter(self.stack.params.values())).device)
            self.stack.reorder(order)
            self.optimiser = _AdamW(self.stack.params, self.config)
            return
        where = {m: j for j, m in enumerate(self.slots)}
        order = torch.tensor([where[m] for m in slots],
                             device=next(iter(self.stack.params.values())).device)
        self.stack.reorder(order)
        self.optimiser.reorder(self.stack.params, order)
        self.slots = list(slots)

    def run(self) -> None:
        for epoch in range(1, self.config.epochs + 1):
            active = [m for m in self.slots if self.training[m]]
            if not active:
                break
            self._epoch(len(active))
            for m in active:
                self.epochs_run[m] = epoch
            self._validate(len(active), epoch)
            order = ([m for m in self.slots if self.training[m]]
                     + [m for m in self.slots if not self.training[m]])
            if order != self.slots:  # a member stopped: keep the active ones in front
                self._reorder(order)

    def _epoch(self, n_active: int) -> None:
        import torch
        import torch.nn.functional as F

        size = self.config.batch_size
        device = self.x.device
        slots = self.slots[:n_active]
        sizes = [self.sizes[m] for m in slots]  # descending
        pad = self.x.shape[1] - 1  # row ``pad``: zeros
        steps = math.ceil(sizes[0] / size)
        order = torch.full((n_active, steps * size), pad, dtype=torch.long)
        for j, m in enumerate(slots):
            order[j, :sizes[j]] = torch.randperm(sizes[j], generator=self.generators[m])
        order = order.to(device)
        members = torch.tensor(slots, device=device)[:, None]
        classes = self.y.shape[2]
        for step in range(steps):
            counts = [min(size, s - step * size) for s in sizes if s > step * size]
            k, width = len(counts), counts[0]
            rows, who = order[:k, step * size:step * size + width], members[:k]
            x, y = self.x[who, rows], self.y[who, rows]
            # BCE mean over each member's own batch; unknown labels and padding: weight 0
            share = torch.tensor([1.0 / (r * classes) for r in counts], device=device)
            weight = self.known[who, rows] * share[:, None, None]
            generators = [self.generators[m] for m in slots[:k]]

            def dropout(shape: tuple, p: float) -> Any:
                draw = torch.ones(shape[0], shape[1], shape[2])
                for j, generator in enumerate(generators):  # each from its own stream
                    torch.rand(counts[j], shape[2], generator=generator,
                               out=draw[j, :counts[j]])
                return ((draw >= p) / (1 - p)).to(device)

            leaves = self.stack.leaves(k)
            logits = self.stack.forward(x, leaves, dropout)
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                    * weight).sum()
            loss.backward()
            self.optimiser.step(range(k), {n: leaf.grad for n, leaf in leaves.items()})

    def _validate(self, n_active: int, epoch: int) -> None:
        import torch

        slots = self.slots[:n_active]
        if all(self.val[m] is None for m in slots):
            return
        who = torch.tensor(slots, device=self.x_val.device)
        with torch.no_grad():  # every member's val sample in one batched pass
            logits = self.stack.forward(self.x_val[who], self.stack.prefix(n_active))
            logits = logits.double().cpu().numpy()
        checked = [(j, m) for j, m in enumerate(slots) if self.val[m] is not None]
        aucs = val_mean_aucs_each([self.val[m][1] for _, m in checked],
                                  [logits[j, :len(self.val[m][1])] for j, m in checked])
        for (j, m), auc in zip(checked, aucs):
            if not np.isnan(auc) and (self.best_auc[m] is None or auc > self.best_auc[m]):
                self.best_auc[m], self.best_epoch[m], self.stale[m] = auc, epoch, 0
                for name, best in self.best.items():
                    best[m].copy_(self.stack.params[name][j])
                self.has_best[m] = True
            else:
                self.stale[m] += 1
                if self.stale[m] >= self.config.patience:
                    self.training[m] = False

    def member_state(self, m: int) -> dict[str, Any]:
        """Member ``m``'s kept weights (its best epoch, else its last) in torch's layout."""
        if self.has_best[m]:
            return self.stack.torch_layout(self.best, m)
        return self.stack.torch_layout(self.stack.params, self.slots.index(m))

    def selected(self, m: int, adapted_init: bool) -> dict[str, Any]:
        by_val = self.has_best[m]
        return {"epoch": self.best_epoch[m] if by_val else self.epochs_run[m],
                "epochs_run": self.epochs_run[m], "by": "val" if by_val else "last",
                "val_mean_auc": None if self.best_auc[m] is None else float(self.best_auc[m]),
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
