"""Reader: store rows -> batches of uint8 pixels, read a few batches ahead of the model.

The reader works in store rows: ``rows[i]`` is filled from image ``source_rows[i]`` of an
:class:`~cxrembed.data.cache.ImageSource` (a pixel cache, or PNGs decoded on the fly), or
is skipped when that is -1 (an image no longer in the dataset). Any list of images can be
read this way (a resume, a shard, rows appended to a store).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GONE = "no longer in the dataset (removed from disk or from the lists)"


@dataclass
class Batch:
    """One batch of store rows; ``pixels`` holds only the rows that were read."""

    rows: np.ndarray  # store rows, consecutive
    ok: np.ndarray  # bool per row: read (False: skipped)
    pixels: Any  # uint8 tensor (ok.sum(), S, S), pinned for a GPU
    skipped: dict[int, str] = field(default_factory=dict)  # store row -> why
    read_seconds: float = 0.0  # time the runner waited for this batch


class BatchReader:
    """Iterate :class:`Batch` in row order while threads prepare the next ones.

    OpenCV decoding and HDF5 reads of the pixel cache release the GIL, so threads overlap
    them with the model without pickling anything into workers. Threads do no torch work:
    on a CPU, torch ops in a reader thread fight the model's OpenMP threads for the same
    cores (measured: half the throughput of the cxr-tiny model).

    Args:
        source: an ImageSource.
        rows, source_rows: store rows to fill and the source row of each (-1: gone).
        skip_bad: an unreadable image is skipped (and reported) instead of stopping.
        workers: threads reading ahead (0: read inline); ``depth`` batches in flight.
    """

    def __init__(self, source: Any, rows: np.ndarray, source_rows: np.ndarray,
                 batch_size: int, *, skip_bad: bool = False, workers: int = 2,
                 depth: int | None = None, pin_memory: bool = False) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        source_rows = np.asarray(source_rows, dtype=np.int64)
        self.source, self.skip_bad, self.pin = source, skip_bad, pin_memory
        self.workers = workers
        self.depth = max(1, depth if depth is not None else 2 * max(1, workers))
        self.batches = [(rows[i:i + batch_size], source_rows[i:i + batch_size])
                        for i in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def read(self, rows: np.ndarray, source_rows: np.ndarray) -> Batch:
        """Read one batch (in whichever thread calls it)."""
        import torch

        ok = source_rows >= 0
        skipped = {int(r): GONE for r in rows[~ok]}
        if self.skip_bad:
            pixels, readable, reasons = self.source.read_checked(source_rows[ok])
            for row, reason in zip(rows[ok][~readable], reasons):
                skipped[int(row)] = reason
                log.warning("skipping image of row %d: %s", row, reason)
            ok[ok] = readable
        else:
            pixels = self.source.read(source_rows[ok])
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        return Batch(rows, ok, pixels.pin_memory() if self.pin else pixels, skipped)

    def __iter__(self) -> Iterator[Batch]:
        if self.workers <= 0:
            for rows, source_rows in self.batches:
                began = time.perf_counter()
                batch = self.read(rows, source_rows)
                batch.read_seconds = time.perf_counter() - began
                yield batch
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cxrembed-read") as pool:
            pending: deque = deque()
            upcoming = iter(self.batches)
            try:
                for job in upcoming:
                    pending.append(pool.submit(self.read, *job))
                    if len(pending) >= self.depth:
                        break
                while pending:
                    future = pending.popleft()
                    job = next(upcoming, None)
                    if job is not None:
                        pending.append(pool.submit(self.read, *job))
                    began = time.perf_counter()
                    batch = future.result()
                    batch.read_seconds = time.perf_counter() - began
                    yield batch
            finally:
                for future in pending:
                    future.cancel()

