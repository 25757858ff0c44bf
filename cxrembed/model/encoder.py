"""The encoder every later stage uses: images (and prompts) -> CLIP joint-space vectors.

``load_encoder`` gives either a plain CLIP (tag | file | none) or an adapted one (a run
folder of ``cxrembed adapt``, with its head). Its ``fingerprint`` is what stores record
to refuse mixing vectors of different encoders: equal dicts mean the same weights,
preprocessing and label order, whatever the paths.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from cxrembed.data.images import PREPROCESSING
from cxrembed.errors import ModelError
from cxrembed.labels import LABELS
from cxrembed.model.adapted import AdaptedCLIP, load_adapted, read_adapted_meta
from cxrembed.model.head import DiagnosisHead
from cxrembed.model.loading import WeightsSource, build_clip, create_clip

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


class Encoder:
    """A loaded CLIP (optionally adapted, with the paper's head), ready for inference.

    Attributes: ``model_name``, ``embed_dim``, ``has_text``, ``has_head``,
    ``fingerprint`` (JSON-able), ``device``, ``clip`` (the open_clip model), ``head``.
    On CUDA, images run under bf16 autocast in channels-last layout unless ``amp=False``;
    outputs are float32 either way.
    """

    def __init__(self, clip: nn.Module, *, model_name: str, source: WeightsSource,
                 weights: dict, head: DiagnosisHead | None = None, unfreeze: int | None = None,
                 run: str | None = None, device: str | torch.device = "cpu", amp: bool = True,
                 label_names: list[str] | tuple[str, ...] | None = None,
                 vocabulary: str | None = None) -> None:
        self.device = torch.device(device)
        self.model_name = model_name
        #: Where the weights came from (kind "tag" / "file" / "none" / "run").
        self.source = source
        #: The adapted run folder, or None for a plain CLIP.
        self.run = run
        self.clip = clip.to(self.device).eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.head = head.to(self.device).eval() if head is not None else None
        if self.head is not None:
            for p in self.head.parameters():
                p.requires_grad_(False)
        self.amp = amp and self.device.type == "cuda"
        if self.amp:
            self.clip.visual.to(memory_format=torch.channels_last)
        proj = getattr(clip.visual, "proj", None)
        self.embed_dim = int(proj.shape[1]) if isinstance(proj, torch.Tensor) else int(
            getattr(clip.visual, "output_dim"))
        self.has_text = hasattr(clip, "encode_text") and (
            hasattr(clip, "text") or hasattr(clip, "token_embedding"))
        self.has_head = self.head is not None
        self.unfreeze = unfreeze
        #: The adapted head's classes, in the order of its logits (the data it was adapted
        #: on); None without a head. ``vocabulary``: the collection naming them (nih, ...).
        self.label_names = (list(label_names or LABELS) if self.has_head else None)
        self.vocabulary = (vocabulary or "nih") if self.has_head else None
        self.fingerprint = {
            "model": model_name,
            "weights": weights,
            "unfreeze": unfreeze,
            "preprocessing": PREPROCESSING,
            "labels": list(self.label_names or LABELS),
        }
        self._tokenizer = None

    @property
    def load_args(self) -> dict:
        """Keyword arguments of :func:`load_encoder` that load this encoder again."""
        if self.run is not None:
            return {"checkpoint": self.run}
        return {"model": self.model_name, "pretrained": self.source.name,
                "quick_gelu": self.source.quick_gelu}

    def __repr__(self) -> str:
        return (f"Encoder({self.model_name}, weights={self.fingerprint['weights'].get('kind')}, "
                f"head={self.has_head}, device={self.device})")

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×224×224 normalised images -> B×D float32, NOT L2-normalised."""
        x = images.to(self.device, non_blocking=True)
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.clip.encode_image(x)
        return out.float()

    @torch.inference_mode()
    def head_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B×D unnormalised embeddings -> B×C logits of the adapted head (``label_names``
        order)."""
        if self.head is None:
            raise ModelError(f"encoder {self.model_name} has no adapted head; load it with "
                             "checkpoint=RUN (the folder of `cxrembed adapt`)")
        return self.head(embeddings.to(self.device).float()).float()

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> P×D float32, NOT L2-normalised."""
        if not self.has_text:
            raise ModelError(f"encoder {self.model_name} has no text tower")
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        tokens = self._tokenizer(list(prompts)).to(self.device)
        with self._autocast():
            out = self.clip.encode_text(tokens)
        return out.float()

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the adapted head's weights (for few-shot ``--init adapted``)."""
        if self.head is None:
            raise ModelError(f"encoder {self.model_name} has no adapted head to copy")
        return {k: v.detach().to("cpu", copy=True) for k, v in self.head.state_dict().items()}


def load_encoder(model: str | None = None, pretrained: str | os.PathLike | None = None, *,
                 checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto",
                 trust_pickle: bool = False, quick_gelu: bool | None = None,
                 cache_dir: str | None = None, amp: bool = True) -> Encoder:
    """Load an encoder.

    Without ``checkpoint``: ``model`` (default ViT-B-32) with ``pretrained`` weights (an
    open_clip tag, default ``openai``; a local file; or ``none``).
    With ``checkpoint`` (a finished ``cxrembed adapt`` run folder): the adapted encoder and
    its head; ``model`` and ``pretrained`` may be omitted, and when given must match what
    the run was adapted from (ModelError otherwise). ``device``: ``auto`` (CUDA when
    available), ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`cxrembed.device.resolve_device`).
    """
    from cxrembed.device import resolve_device

    device = resolve_device(device)  # before loading: an impossible device fails at once
    if checkpoint is None:
        model = model or DEFAULT_MODEL
        clip, source = create_clip(model, DEFAULT_PRETRAINED if pretrained is None
                                   else pretrained, trust_pickle=trust_pickle,
                                   quick_gelu=quick_gelu, cache_dir=cache_dir)
        return Encoder(clip, model_name=model, source=source, weights=source.fingerprint(),
                       device=device, amp=amp)

    meta = read_adapted_meta(checkpoint)
    if model is not None and model != meta["model"]:
        raise ModelError(f"{checkpoint} was adapted from {meta['model']}, not {model}; drop "
                         "--model or pass the run's own")
    base = meta["base_weights"]
    if pretrained is not None and not _same_base(str(pretrained), base):
        raise ModelError(f"{checkpoint} was adapted from weights {_describe_base(base)}, not "
                         f"{pretrained}; drop --pretrained when loading a run")
    if quick_gelu is not None and bool(quick_gelu) != bool(meta["quick_gelu"]):
        raise ModelError(f"{checkpoint} was adapted with QuickGELU={meta['quick_gelu']}; "
                         "drop the quick_gelu override")
    clip = build_clip(meta["model"], bool(meta["quick_gelu"]))
    adapted: AdaptedCLIP = load_adapted(checkpoint, clip, meta)
    weights = {"kind": "run", "sha256": meta["sha256"], "base": base}
    log.info("adapted encoder %s from %s (unfreeze %d)", meta["model"], checkpoint,
             meta["unfreeze"])
    source = WeightsSource("run", str(Path(checkpoint)), meta["sha256"],
                           bool(meta["quick_gelu"]), "recorded in the run's model.json")
    return Encoder(adapted.clip, model_name=meta["model"], source=source, weights=weights,
                   head=adapted.head, unfreeze=int(meta["unfreeze"]), run=str(Path(checkpoint)),
                   device=device, amp=amp, label_names=meta["labels"],
                   vocabulary=meta.get("vocabulary"))


def _same_base(pretrained: str, base: dict) -> bool:
    if base.get("kind") == "none":
        return pretrained.strip().lower() in ("none", "random", "")
    if base.get("kind") == "tag" and pretrained == base.get("tag"):
        return True
    if Path(pretrained).is_file():
        from cxrembed.model.weights import sha256_file

        return sha256_file(pretrained) == base.get("sha256")
    return False


def _describe_base(base: dict) -> str:
    if base.get("kind") == "tag":
        return f"tag {base.get('tag')!r}"
    if base.get("kind") == "file":
        return f"a file with SHA-256 {str(base.get('sha256'))[:12]}…"
    return "none (random init)"
