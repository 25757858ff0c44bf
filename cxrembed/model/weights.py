"""Reading CLIP weight files without running code from them.

Three formats are read:

* ``.safetensors``: tensors only, by construction.
* ``torch.save`` files (``.pt``, ``.pth``, ``.bin``; open_clip training checkpoints with a
  ``state_dict`` key included): ``torch.load(weights_only=True)``, which refuses any
  pickled object other than tensors and plain containers. ``trust_pickle=True`` lifts
  that, for files whose source you trust.
* TorchScript archives (OpenAI's ``ViT-B-32.pt``): by default the tensors are taken out
  of the archive's ``data.pkl`` with a restricted unpickler that knows tensors and
  nothing else, so neither Python code nor TorchScript is run. ``trust_pickle=True``
  uses ``torch.jit.load`` instead (needed only if an archive is laid out in a way the
  restricted reader does not know).

Also here: telling OpenAI-trained weights (QuickGELU) from others, and describing the
architecture a state dict holds, for error messages.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from cxrembed.errors import ModelError

log = logging.getLogger(__name__)

#: Keys OpenAI's state dicts carry besides the weights.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
TRUST_HINT = ("If you trust where the file comes from, pass trust_pickle=True "
              "(`--trust-pickle` on the command line); better, convert it once to "
              ".safetensors on a machine where you trust it")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# TorchScript archives, read without running them

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a scripted module: keeps the attributes pickled for it, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Storage:
    def __init__(self, raw: bytes, dtype: torch.dtype) -> None:
        self.raw, self.dtype = raw, dtype


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: object
                    ) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(storage.raw), dtype=storage.dtype) if storage.raw else \
        torch.empty(0, dtype=storage.dtype)
    return flat.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data: torch.Tensor, *_: object) -> torch.Tensor:
    return data


_JIT_LIST_BUILDERS = {
    "build_intlist": list, "build_doublelist": list, "build_boollist": list,
    "build_tensorlist": list,
    "restore_type_tag": lambda value, _type: value,
}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return _JIT_LIST_BUILDERS[name]  # TorchScript's typed lists and type tags
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self.script_classes:
                self.script_classes[key] = type(name, (_ScriptObject,), {})
            return self.script_classes[key]
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor type")

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
        if dtype is None:
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        return _Storage(self.archive.read(f"{self.prefix}data/{key}"), dtype)


def _flatten(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _ScriptObject):
        _flatten(getattr(obj, "state", None), prefix, out)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, str):
                _flatten(value, f"{prefix}{key}.", out)


def is_torchscript(path: str | Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def read_torchscript_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], bool | None]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name,
    without running its code; plus whether its code defines QuickGELU (None: no code)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(data_pkl) != 1:
            raise ModelError(f"{path} looks like a TorchScript archive but has no single "
                             f"data.pkl. {TRUST_HINT}")
        prefix = data_pkl[0][: -len("data.pkl")]
        try:
            root = _TensorsOnlyUnpickler(archive.read(data_pkl[0]), archive, prefix).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ModelError(f"cannot read the tensors of TorchScript archive {path} without "
                             f"running it ({exc}). {TRUST_HINT}") from None
        code = [n for n in names if n.startswith(f"{prefix}code/") and n.endswith(".py")]
        quick_gelu = any(b"QuickGELU" in archive.read(n) for n in code) if code else None
    tensors: dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors)
    return tensors, quick_gelu


# ---------------------------------------------------------------------------------------
# Any weights file


def read_weights(path: str | Path, *, trust_pickle: bool = False
                 ) -> tuple[dict[str, torch.Tensor], str, bool | None]:
    """Read a CLIP weights file into a flat state dict on the CPU.

    Returns ``(state_dict, format, quick_gelu_hint)`` where format is ``safetensors``,
    ``torch`` or ``torchscript`` and the hint is what the file itself says about its
    activation (None when it says nothing). Raises ModelError for unreadable files and
    for pickled code unless ``trust_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    hint: bool | None = None
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read safetensors file {path}: {exc}") from None
        fmt = "safetensors"
    elif is_torchscript(path):
        fmt = "torchscript"
        if trust_pickle:
            try:
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
            except RuntimeError as exc:
                raise ModelError(f"torch.jit.load cannot read {path}: {exc}") from None
            _, hint = _torchscript_code_hint(path)
        else:
            obj, hint = read_torchscript_tensors(path)
    else:
        fmt = "torch"
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise ModelError(
                f"refusing to load {path}: it holds pickled Python objects other than tensors, "
                f"which would run code when loaded ({first[:200]}). {TRUST_HINT}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read weights file {path}: {exc}; expected an open_clip "
                             "state dict (.pt/.pth/.bin), a .safetensors file or OpenAI's "
                             "TorchScript ViT-B-32.pt") from None
    return _as_state_dict(obj, path), fmt, hint


def _torchscript_code_hint(path: Path) -> tuple[None, bool | None]:
    with zipfile.ZipFile(path) as archive:
        code = [n for n in archive.namelist() if "/code/" in n and n.endswith(".py")]
        return None, (any(b"QuickGELU" in archive.read(n) for n in code) if code else None)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # 8-byte little-endian header length, then a JSON object
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            state[key[7:] if key.startswith("module.") else key] = value
    if not state:
        raise ModelError(f"{path} holds no tensors")
    return state


# ---------------------------------------------------------------------------------------
# What the weights are


def _known_hash_prefixes() -> dict[str, bool]:
    """SHA-256 prefixes of the published checkpoints open_clip downloads by URL, with
    whether each was trained with QuickGELU."""
    from open_clip import get_pretrained_cfg, list_pretrained

    known = {}
    for model, tag in list_pretrained():
        cfg = get_pretrained_cfg(model, tag)
        url = cfg.get("url", "")
        if "openaipublic" in url:
            known[url.split("/")[-2]] = bool(cfg.get("quick_gelu", False))
        elif "mlfoundations" in url:
            known[Path(url).stem.split("-")[-1]] = bool(cfg.get("quick_gelu", False))
    return known


def detect_quick_gelu(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                      file_hint: bool | None, sha256: str | None = None) -> tuple[bool, str]:
    """Whether weights from ``path`` need QuickGELU, and why.

    OpenAI trained CLIP with QuickGELU (x·σ(1.702x)); open_clip's default is exact GELU,
    and the wrong one silently degrades the features. Evidence, strongest first: the
    TorchScript code of the archive; OpenAI's extra state-dict keys; OpenAI's mixed
    precision (fp16 weights with fp32 LayerNorms); the file's hash among published
    QuickGELU checkpoints; an ``open_clip_config.json`` beside the file (Hugging Face
    downloads have one). With none of these: GELU.
    """
    path = Path(path)
    if file_hint is not None:
        return file_hint, "the TorchScript archive's code " + (
            "defines QuickGELU" if file_hint else "does not use QuickGELU")
    if any(k in state_dict for k in OPENAI_EXTRA_KEYS):
        return True, "OpenAI state-dict keys (input_resolution, context_length, vocab_size)"
    conv, ln = state_dict.get("visual.conv1.weight"), state_dict.get("visual.ln_post.weight")
    if conv is not None and ln is not None and conv.dtype == torch.float16 \
            and ln.dtype == torch.float32:
        return True, "OpenAI's mixed precision (fp16 weights, fp32 LayerNorms)"
    if sha256:
        for prefix, quick in _known_hash_prefixes().items():
            if sha256.startswith(prefix):
                return quick, f"SHA-256 of a published checkpoint ({prefix[:12]}…)"
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            cfg = cfg.get("model_cfg", cfg)
            return bool(cfg.get("quick_gelu", False)), f"{config}"
        except (OSError, ValueError, AttributeError):
            pass
    return False, "no sign of OpenAI training in the file"


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short description of the image tower a state dict holds, with the open_clip
    architecture names it matches, for 'wrong architecture' messages."""
    from open_clip import get_model_config, list_models

    conv = state_dict.get("visual.conv1.weight")
    pos = state_dict.get("visual.positional_embedding")
    proj = state_dict.get("visual.proj")
    if conv is None or pos is None or proj is None or conv.ndim != 4:
        keys = ", ".join(list(state_dict)[:4])
        return f"not an open_clip ViT CLIP state dict (first keys: {keys})"
    blocks = {m.group(1) for k in state_dict
              if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    width, patch = conv.shape[0], conv.shape[-1]
    image = patch * round((pos.shape[0] - 1) ** 0.5)
    embed = proj.shape[1]
    matches = []
    for name in list_models():
        cfg = get_model_config(name) or {}
        vision = cfg.get("vision_cfg", {})
        if (vision.get("width"), vision.get("layers"), vision.get("patch_size"),
                vision.get("image_size"), cfg.get("embed_dim")) == (
                width, len(blocks), patch, image, embed):
            matches.append(name)
    text = (f"a ViT image tower of width {width}, {len(blocks)} blocks, patch {patch}, "
            f"image size {image}, embedding {embed}")
    if matches:
        text += f" (matches --model {' / '.join(matches[:4])})"
    return text
