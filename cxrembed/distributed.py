"""More than one process: what ``torchrun`` (or ``srun`` setting the same variables) tells a
process, and the few collectives adapt needs.

``torchrun --nproc_per_node N -m cxrembed adapt ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. Without these variables (or with ``WORLD_SIZE=1``) every function here
describes a single process and nothing is initialised: a plain ``cxrembed adapt`` runs
exactly as it did.

- :func:`launch` reads the variables (no torch import): who am I, how many are we.
- :func:`process_group` (or the :func:`in_process_group` decorator of a library entry
  point) joins the job's process group for the duration of a command: NCCL
  when the model runs on CUDA, gloo on the CPU, with a timeout on every collective so that
  a rank that stops answering ends the job with an error instead of hanging it (under
  ``torchrun`` a rank that *exits* ends the job at once: its agent stops the others).
- :func:`gather_rows`, :func:`sum_over_ranks`, :func:`barrier`: the collectives adapt uses.

``CXREMBED_DIST_TIMEOUT`` (seconds, default 1800) sets the collective timeout.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from cxrembed.errors import ConfigError

log = logging.getLogger(__name__)

#: Default seconds a collective waits for the other ranks before failing the job.
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "CXREMBED_DIST_TIMEOUT"


@dataclass(frozen=True)
class Launch:
    """This process's place in the job (``rank 0 of 1`` when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and the store."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by "
                          "torchrun or your launcher)") from None


def launch() -> Launch:
    """The launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (a single process when
    unset). ConfigError when they contradict each other."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected "
                          "0 <= RANK < WORLD_SIZE (set by torchrun or your launcher)")
    return Launch(rank, world, local)


def timeout() -> timedelta:
    """How long a collective waits for the slowest rank (``CXREMBED_DIST_TIMEOUT``)."""
    seconds = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise ConfigError(f"{TIMEOUT_ENV}={seconds}: give a positive number of seconds")
    return timedelta(seconds=seconds)


@contextmanager
def process_group(device: Any) -> Iterator[Launch]:
    """Join the job's process group while the block runs (nothing for a single process).

    ``device`` is where the model runs: CUDA means NCCL, anything else gloo. A group that
    the caller already initialised is used as it is and left open.
    """
    here = launch()
    if not here.distributed:
        yield here
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield Launch(dist.get_rank(), dist.get_world_size(), here.local_rank)
        return
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    limit = timeout()
    log.info("%s: joining the process group (%s, collective timeout %d s)", here, backend,
             limit.total_seconds())
    dist.init_process_group(backend, timeout=limit)
    try:
        yield here
    finally:
        dist.destroy_process_group()


def in_process_group(fn: Callable) -> Callable:
    """Run ``fn(..., device=...)`` inside :func:`process_group` on its resolved device (a
    library entry point that every rank of a torchrun job calls)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not launch().distributed:
            return fn(*args, **kwargs)
        from cxrembed.device import resolve_device

        with process_group(resolve_device(kwargs.get("device"))):
            return fn(*args, **kwargs)

    return wrapper


def active() -> Launch:
    """This process's place in the process group it has joined (rank 0 of 1 when it has
    joined none: collectives below are then no-ops)."""
    import sys

    if "torch" not in sys.modules:  # nothing can have joined a group without torch
        return Launch()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Launch()
    return Launch(dist.get_rank(), dist.get_world_size(), launch().local_rank)


def barrier() -> None:
    """Wait for every rank (nothing for a single process)."""
    if active().distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; ``value`` itself for one process)."""
    if not active().distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, on the CPU with gloo)."""
    if not active().distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.cpu().tolist()


def gather_rows(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(rows, values)`` concatenated in rank order, on every rank."""
    if not active().distributed:
        return rows, values
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (np.asarray(rows), np.asarray(values)))
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))


def rank_share(count: int, world_size: int, rank: int, multiple: int = 1) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share of ``count`` items, cut at multiples
    of ``multiple`` (the earlier ranks take the remainder, one unit each)."""
    units = -(-count // multiple)
    per, extra = divmod(units, world_size)
    start = rank * per + min(rank, extra)
    stop = start + per + (rank < extra)
    return min(start * multiple, count), min(stop * multiple, count)
