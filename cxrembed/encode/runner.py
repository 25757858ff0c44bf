"""Runner: reader -> mapper -> writer, timing each stage of each batch.

Per batch it logs (DEBUG, shown by ``cxrembed --verbose``) how long the runner waited for
the reader, how long the model took, and how long the writer took, so the bottleneck of a
machine is visible; the totals go into the encode's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class StageSeconds:
    """Seconds spent per stage over a run (read = waiting for the reader's next batch)."""

    read: float = 0.0
    infer: float = 0.0
    write: float = 0.0
    batches: int = 0
    images: int = 0  # images through the model (skipped ones excluded)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def run_pipeline(reader: Iterable[Any], mapper: Callable[[Any], tuple], writer: Any, *,
                 advance: Callable[[int], None] = lambda n: None) -> StageSeconds:
    """Map every batch of ``reader`` and append it to ``writer`` in order, then write what
    the writer still buffers.

    Skipped rows of a batch get zero vectors (and logits) and are passed to the writer as
    skipped; the model sees only the rows that were read.
    """
    times = StageSeconds()
    for batch in reader:
        began = time.perf_counter()
        n_ok = int(batch.ok.sum())
        emb = np.zeros((len(batch.rows), writer.embed_dim), np.float32)
        logits = None
        if n_ok:
            vectors, head = mapper(batch.pixels)
            emb[batch.ok] = vectors
            if head is not None:
                logits = np.zeros((len(batch.rows), head.shape[1]), np.float32)
                logits[batch.ok] = head
        if writer.has_head and logits is None:  # every image of the batch was skipped
            logits = np.zeros((len(batch.rows), writer.num_classes), np.float32)
        inferred = time.perf_counter()
        writer.append(emb, logits, skipped=batch.skipped)
        wrote = time.perf_counter()
        times.read += batch.read_seconds
        times.infer += inferred - began
        times.write += wrote - inferred
        times.batches += 1
        times.images += n_ok
        log.debug("batch %d (rows %d-%d): read %.3f s, infer %.3f s, write %.3f s",
                  times.batches, batch.rows[0], batch.rows[-1], batch.read_seconds,
                  inferred - began, wrote - inferred)
        advance(len(batch.rows))
    began = time.perf_counter()
    writer.flush()  # the last, partial chunk
    times.write += time.perf_counter() - began
    return times
