"""Where torch runs: the one place that turns ``--device`` into a ``torch.device``.

Used by adapt, encode, search (a query image or text encoded with the store's encoder) and
the demo, so that ``auto`` means the same everywhere and an impossible request fails at
once with a message instead of deep inside torch.
"""

from __future__ import annotations

import re

from cxrembed.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: object = "auto") -> "torch.device":  # noqa: F821
    """``auto`` (or None): the first CUDA device when torch sees one, else the CPU.
    ``cpu``, ``cuda``, ``cuda:N``: that device; ConfigError when it is not there.
    A ``torch.device`` is checked the same way.

    Under torchrun, ``auto`` and ``cuda`` mean this process's own GPU: ``cuda:LOCAL_RANK``
    (modulo the GPUs it sees, for launchers such as ``srun --gpus-per-task 1`` that show
    each process only its own)."""
    import torch

    from cxrembed.distributed import launch

    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda" and launch().distributed and torch.cuda.is_available():
        text = f"cuda:{launch().local_rank % torch.cuda.device_count()}"
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(text)
    if match is None:
        raise ConfigError(f"unknown device {name!r}; expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
        raise ConfigError(f"--device {text}: {why} (torch {torch.__version__}); use "
                          "--device cpu, or auto to take a GPU only when there is one")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {text}: torch sees {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return torch.device(text)
