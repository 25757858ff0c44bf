"""The text side of a store (:class:`StoreText`, a part of
:class:`~cxrembed.store.reader.EmbeddingStore`): the class prompts and their embeddings
stored at encode time, and new prompts encoded with the store's own encoder."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cxrembed.errors import StoreError
from cxrembed.store.fingerprint import check_same_encoder


class StoreText:
    """Text prompts of an open store; mixed into EmbeddingStore, whose ``path``, ``attrs``,
    ``_file``, ``has_text`` and ``embed_dim`` it reads."""

    def _require_text(self) -> None:
        if not self.has_text:
            raise StoreError(f"store {self.path} was encoded with "
                             f"{self.attrs.get('model_name')!r}, which has no text tower: "
                             "text prompts and text queries need a CLIP with one")

    @property
    def prompts(self) -> dict[str, tuple[list[str], list[str]]]:
        """The class prompts stored: ``{class: ([positive], [negative])}``."""
        self._require_text()
        raw = json.loads(self._file["text"].attrs["prompts"])
        return {name: (list(pos), list(neg)) for name, (pos, neg) in raw.items()}

    def text_embeddings(self, normalized: bool = True) -> dict[str, np.ndarray]:
        """``{prompt: float32 vector}`` for every stored prompt."""
        self._require_text()
        names = self._file["text/prompt"].asstr()[:]
        vectors = self._file["text/embedding"][:].astype(np.float32)
        if normalized:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return dict(zip(names, vectors))

    def encoder(self, device: str = "auto") -> Any:
        """Load the encoder that made this store (its weights must be reachable here) and
        check that its fingerprint is the store's. ``device``: see
        :func:`cxrembed.device.resolve_device`."""
        from cxrembed.model import load_encoder

        args = self.attrs.get("load_args")
        if not args:
            raise StoreError(f"store {self.path} does not record how to load its encoder "
                             f"({self.attrs.get('model_name')}); pass the encoder yourself")
        encoder = load_encoder(**args, device=device)
        check_same_encoder(self, encoder, what=(f"store {self.path}",
                                                f"the encoder loaded from {args}"))
        return encoder

    def encode_prompts(self, prompts: list[str], normalized: bool = True,
                       encoder: Any = None) -> np.ndarray:
        """float32 ``(P, D)`` text embeddings: stored ones reused, the rest encoded with
        the store's own encoder (loaded once, only when needed)."""
        self._require_text()
        stored = self.text_embeddings(normalized=False)
        missing = [p for p in dict.fromkeys(prompts) if p not in stored]
        if missing:
            import torch

            encoder = encoder or self.encoder()
            check_same_encoder(self, encoder)
            with torch.no_grad():
                new = encoder.encode_text(missing).float().cpu().numpy()
            stored.update(zip(missing, new))
        out = np.stack([stored[p] for p in prompts]).astype(np.float32) if prompts else \
            np.zeros((0, self.embed_dim), np.float32)
        if normalized and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
