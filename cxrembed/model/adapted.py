"""The adapted model (CLIP + the paper's head, top blocks trainable) and its checkpoint.

An adapted checkpoint is two files in the run folder:

``model.safetensors``
    every tensor of the CLIP model under ``clip.`` (image *and* text tower, so the
    adapted encoder can still embed prompts) and of the head under ``head.``; the best
    epoch's weights.
``model.json``
    what is needed to rebuild it and to refuse a mismatched use: format, architecture,
    QuickGELU, the base weights' fingerprint, unfreeze depth, head shape, label names (the
    training data's own classes, in the head's order) and their vocabulary,
    preprocessing, the SHA-256 of ``model.safetensors``, and the run's selection figures.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from cxrembed.data.images import PREPROCESSING
from cxrembed.errors import ModelError
from cxrembed.files import atomic_write_text
from cxrembed.labels import LABELS
from cxrembed.model.head import DiagnosisHead
from cxrembed.model.partial import apply_partial_unfreeze, check_unfreeze
from cxrembed.model.run_state import save_tensors
from cxrembed.model.weights import sha256_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "cxrembed-adapted-encoder"


class AdaptedCLIP(nn.Module):
    """CLIP whose top ``unfreeze`` visual blocks, ``ln_post`` and ``proj`` train, with the
    MLP head on its (unnormalised) image embedding. ``forward(images) -> logits``."""

    def __init__(self, clip: nn.Module, head: DiagnosisHead, unfreeze: int) -> None:
        super().__init__()
        check_unfreeze(clip, unfreeze)
        self.clip, self.head, self.unfreeze = clip, head, unfreeze
        self.freeze()

    def freeze(self) -> None:
        """(Re)apply the partial freeze: only the top blocks, ln_post, proj and head train."""
        apply_partial_unfreeze(self.clip, self.unfreeze)
        for p in self.head.parameters():
            p.requires_grad_(True)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.clip.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised joint-space image embedding (open_clip's public ``encode_image``;
        the frozen part builds no graph: see :mod:`cxrembed.model.partial`)."""
        return self.clip.encode_image(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of every trainable tensor (what a resume or the best-epoch
        snapshot needs: the frozen rest never changes)."""
        return {name: p.detach().to("cpu", copy=True)
                for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`trainable_state_dict` back in place (ModelError if it does not fit)."""
        params = dict(self.named_parameters())
        wanted = {n for n, p in params.items() if p.requires_grad}
        if set(state) != wanted:
            diff = sorted(set(state) ^ wanted)
            raise ModelError(f"trainable weights do not fit this model (e.g. {diff[0]}); the "
                             "checkpoint was written with another --model or --unfreeze")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def head_config(head: DiagnosisHead) -> dict:
    linears = [m for m in head if isinstance(m, nn.Linear)]
    drops = [m.p for m in head if isinstance(m, nn.Dropout)]
    return {"in_dim": linears[0].in_features,
            "hidden": [linears[0].out_features, linears[1].out_features],
            "num_classes": linears[-1].out_features, "dropout": drops}


def save_adapted(run_dir: str | os.PathLike, model: AdaptedCLIP, *, model_name: str,
                 base_weights: dict, extra: dict | None = None,
                 label_names: tuple[str, ...] | list[str] = LABELS, vocabulary: str = "nih"
                 ) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``run_dir`` (atomically).

    ``label_names`` are the head's outputs in order (the training data's own classes) and
    ``vocabulary`` the collection they are named in (``nih``, ``chexpert``, a CSV's ...):
    what an encode writes beside the logits and a label map matches against."""
    if len(label_names) != model.head.num_classes:
        raise ModelError(f"{len(label_names)} label names for a head of "
                         f"{model.head.num_classes} outputs")
    run_dir = Path(run_dir)
    tensors = {f"clip.{k}": v.detach().to("cpu").contiguous().clone()
               for k, v in model.clip.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().to("cpu").contiguous().clone()
                    for k, v in model.head.state_dict().items()})
    save_tensors(run_dir / MODEL_FILE, tensors, metadata={"format": str(CHECKPOINT_FORMAT)})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "kind": CHECKPOINT_KIND,
        "model": model_name,
        "quick_gelu": bool(base_weights.get("quick_gelu", False)),
        "base_weights": base_weights,
        "unfreeze": model.unfreeze,
        "embed_dim": model.head.in_dim,
        "head": head_config(model.head),
        "labels": list(label_names),
        "vocabulary": vocabulary,
        "preprocessing": PREPROCESSING,
        "sha256": sha256_file(run_dir / MODEL_FILE),
        **(extra or {}),
    }
    atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=2))
    return run_dir / MODEL_FILE


def read_adapted_meta(run_dir: str | os.PathLike) -> dict:
    """``model.json`` of a finished run, checked against this cxrembed (ModelError if not)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / META_FILE
    if not meta_path.is_file():
        hint = (" (the run has not finished: resume it with `cxrembed adapt ... --resume`)"
                if (run_dir / "config.json").is_file() else "")
        raise ModelError(f"{run_dir} holds no adapted model ({META_FILE} is missing){hint}; "
                         "pass the --out folder of a finished `cxrembed adapt` run")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {meta_path}: {exc}") from None
    if meta.get("kind") != CHECKPOINT_KIND or meta.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{meta_path} is not an adapted-encoder checkpoint of format "
                         f"{CHECKPOINT_FORMAT} (kind {meta.get('kind')!r}, format "
                         f"{meta.get('format')!r}); re-run `cxrembed adapt` with this version")
    labels = meta.get("labels")
    outputs = (meta.get("head") or {}).get("num_classes")
    if (not isinstance(labels, list) or not all(isinstance(n, str) and n for n in labels)
            or len(labels) != outputs):
        raise ModelError(f"{meta_path} names labels {labels!r} for a head of {outputs} "
                         "outputs: its head logits would be misread; re-run `cxrembed adapt`")
    meta.setdefault("vocabulary", "nih" if labels == list(LABELS) else None)
    if meta.get("preprocessing") != PREPROCESSING:
        raise ModelError(f"{run_dir} was adapted with preprocessing {meta.get('preprocessing')}; "
                         f"this cxrembed uses {PREPROCESSING}: embeddings would not match")
    return meta


def load_adapted(run_dir: str | os.PathLike, clip: nn.Module, meta: dict,
                 verify: bool = True) -> AdaptedCLIP:
    """Fill ``clip`` (built for ``meta['model']``) and a new head from ``model.safetensors``."""
    from safetensors.torch import load_file

    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; the run folder is incomplete")
    if verify and sha256_file(path) != meta.get("sha256"):
        raise ModelError(f"{path} does not match the SHA-256 recorded in {META_FILE}: it was "
                         "changed or only partly copied; copy the run folder again")
    tensors = load_file(str(path), device="cpu")
    spec = meta["head"]
    head = DiagnosisHead(spec["in_dim"], tuple(spec["hidden"]), spec["num_classes"],
                   tuple(spec["dropout"]))
    clip_state = {k[5:]: v for k, v in tensors.items() if k.startswith("clip.")}
    head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        clip.load_state_dict(clip_state, strict=True)
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit model {meta['model']}: "
                         f"{str(exc).splitlines()[0]}") from None
    return AdaptedCLIP(clip, head, int(meta["unfreeze"]))
