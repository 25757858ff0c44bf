"""Creating an open_clip CLIP from a tag, a local file, or nothing (random init).

``pretrained`` is one of:

* an open_clip tag for the architecture (``openai``, ``laion2b_s34b_b79k``, ...): the
  weights come from the local Hugging Face / open_clip cache when present, else they are
  downloaded; with no network the call fails at once (not after open_clip's minute of
  retries) and says how to pass a local file instead;
* a local file: an open_clip state dict (``.pt``/``.pth``/``.bin``, a training checkpoint
  with a ``state_dict`` key too), a ``.safetensors`` file, or OpenAI's TorchScript
  ``ViT-B-32.pt`` (see :mod:`cxrembed.model.weights`: nothing in it is executed);
* ``none``: random initialisation, seeded, so two loads give the same weights.

QuickGELU: OpenAI's weights (and a few others) need it. For tags open_clip knows it but
only *warns* on a mismatch; here the tag's setting is applied. For files it is detected
(:func:`cxrembed.model.weights.detect_quick_gelu`); ``quick_gelu=True/False`` overrides.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cxrembed.data.images import CLIP_MEAN, CLIP_STD
from cxrembed.errors import ModelError
from cxrembed.model.tiny import register_tiny
from cxrembed.model.weights import (OPENAI_EXTRA_KEYS, describe_state_dict, detect_quick_gelu,
                                    read_weights, sha256_file)

log = logging.getLogger(__name__)

NONE_VALUES = ("none", "random", "")
#: Seed of the random initialisation for ``pretrained="none"`` (fingerprints rely on it).
INIT_SEED = 0
#: Seconds to wait for the weights host before calling the machine offline.
NETWORK_TIMEOUT = 3.0


@dataclass(frozen=True)
class WeightsSource:
    """Where an encoder's weights came from."""

    kind: str  # "tag" | "file" | "none" | "run" (an adapted run folder)
    name: str  # the tag, the file path, "none", or the run folder
    sha256: str | None  # of the weights file; None for random init
    quick_gelu: bool
    quick_gelu_reason: str

    def fingerprint(self) -> dict:
        """JSON-able identity: equal for the same weights wherever the file lies."""
        out = {"kind": self.kind, "sha256": self.sha256, "quick_gelu": self.quick_gelu}
        if self.kind == "tag":
            out["tag"] = self.name
        if self.kind == "none":
            out["init_seed"] = INIT_SEED
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A few words for a header: 'openai weights', 'random init (no pretrained
        weights)', 'weights from FILE', 'adapted run RUN'."""
        return {"tag": f"{self.name} weights", "file": f"weights from {self.name}",
                "none": "random init (no pretrained weights)",
                "run": f"adapted run {self.name}"}.get(self.kind, f"{self.kind} {self.name}")


def list_model_names() -> list[str]:
    """Every architecture name open_clip knows, ``cxr-tiny`` included."""
    import open_clip

    register_tiny()
    return open_clip.list_models()


def check_model_name(model: str) -> None:
    """Raise ModelError naming the valid architectures when ``model`` is unknown."""
    names = list_model_names()
    if model in names:
        return
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    vit = [n for n in names if n.startswith("ViT-B") or n == "cxr-tiny"]
    raise ModelError(f"unknown model {model!r}.{hint} The paper's is ViT-B-32; ViT-B models: "
                     f"{', '.join(vit)}. All {len(names)} architectures: {', '.join(names)}")


def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith(".")
            or Path(value).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


# ---------------------------------------------------------------------------------------
# Tags: cache first, network only when needed, and fail fast without one


def _tag_candidates(cfg: dict, cache_dir: str | None) -> Iterator[str]:
    """Local paths where open_clip's downloader would have put the tag's weights."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("file"):
        yield cfg["file"]
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            # open_clip's convention: "org/repo/" (default file name) or "org/repo/file".
            repo, filename = os.path.split(cfg["hf_hub"])
            if not filename:
                names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
            elif filename.endswith((".bin", ".pth")):
                names = [filename[:-4] + ".safetensors", filename]
            else:
                names = [filename]
            for name in names:
                found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(found, str):
                    yield found
    if cfg.get("url"):
        yield os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"),
                           os.path.basename(cfg["url"]))


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _probe(url: str, timeout: float) -> str | None:
    """None when ``url`` answers an HTTP HEAD within ``timeout`` seconds, else why not.

    Runs in a daemon thread so a hung DNS lookup cannot hold the caller past the timeout.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                outcome.append(None if response.status < 400 else f"HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            outcome.append(f"HTTP {exc.code}")
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            reason = getattr(exc, "reason", exc)
            outcome.append(f"{type(exc).__name__}: {reason}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _download_tag(model: str, tag: str, cfg: dict, cache_dir: str | None,
                  timeout: float) -> str:
    from open_clip.pretrained import download_pretrained

    if cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"
        repo = os.path.split(cfg["hf_hub"])[0]
        where, probe_url = f"{endpoint}/{repo}", f"{endpoint}/api/models/{repo}"
    else:
        where = probe_url = cfg.get("url", "")
    hint = (f"On a machine without internet, pass a local file instead: --pretrained "
            f"/path/to/weights (an open_clip .bin/.pt, a .safetensors file, or OpenAI's "
            f"TorchScript ViT-B-32.pt), downloaded elsewhere from {where}")
    if _hub_offline() and cfg.get("hf_hub"):
        raise ModelError(f"weights {model} / {tag!r} are not in the local cache and "
                         f"HF_HUB_OFFLINE is set. {hint}")
    reason = _probe(probe_url, timeout)
    if reason is not None:
        raise ModelError(f"cannot download weights {model} / {tag!r}: {probe_url} is not "
                         f"reachable ({reason}) and there is no cached copy. {hint}")
    log.info("downloading %s / %s from %s", model, tag, where)
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - open_clip raises bare RuntimeError/OSError
        raise ModelError(f"download of {model} / {tag!r} failed: {exc}. {hint}") from None
    if not path or not Path(path).is_file():
        raise ModelError(f"download of {model} / {tag!r} gave no file. {hint}")
    return str(path)


def resolve_tag(model: str, tag: str, *, cache_dir: str | None = None,
                timeout: float = NETWORK_TIMEOUT) -> tuple[str, dict]:
    """Local path of a tag's weights (downloading if needed) and its open_clip config."""
    from open_clip import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(model)
        known = (f"its tags are: {', '.join(tags)}" if tags else
                 "it has no published weights (use --pretrained none, or a local weights file)")
        raise ModelError(f"{tag!r} is neither a weights tag of {model} nor an existing file; "
                         f"{known}")
    for candidate in _tag_candidates(cfg, cache_dir):
        if Path(candidate).is_file():
            log.info("weights %s / %s from the local cache: %s", model, tag, candidate)
            return candidate, cfg
    return _download_tag(model, tag, cfg, cache_dir, timeout), cfg


# ---------------------------------------------------------------------------------------
# Building the model


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's root-logger warnings about random init: we say what we load."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "open_clip" not in record.pathname or record.levelno > logging.WARNING

    root, filt = logging.getLogger(), _Filter()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def build_clip(model: str, quick_gelu: bool) -> nn.Module:
    """An open_clip model of architecture ``model``, randomly initialised with a fixed seed."""
    import open_clip

    check_model_name(model)
    with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu,
                                          device="cpu")
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"open_clip cannot build {model}: {exc}") from None
    return clip


def load_state_dict_into(clip: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                         model: str, *, ignore_extra: bool = False) -> None:
    """Load weights into ``clip``; ModelError naming both architectures on a mismatch."""
    from open_clip.convert import convert_state_dict

    state = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    state = convert_state_dict(clip, state)
    expected = clip.state_dict()
    if "logit_scale" in state and "logit_scale" in expected:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    if "logit_bias" in expected and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(expected["logit_bias"])
    if ignore_extra:  # TorchScript archives also hold non-persistent buffers
        state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
        raise ModelError(f"{source} does not fit --model {model}: {'; '.join(problems)}. "
                         f"The file holds {describe_state_dict(state_dict)}; pass the matching "
                         "--model or the right file")
    clip.load_state_dict(state, strict=True)


def create_clip(model: str, pretrained: str | os.PathLike | None = "none", *,
                trust_pickle: bool = False, quick_gelu: bool | None = None,
                cache_dir: str | None = None, network_timeout: float = NETWORK_TIMEOUT
                ) -> tuple[nn.Module, WeightsSource]:
    """Build ``model`` with weights from ``pretrained`` (tag | file | none), on the CPU, in
    eval mode, and say where the weights came from.

    ``quick_gelu`` None means: from the tag, or detected from the file (see module doc).
    """
    check_model_name(model)
    value = "none" if pretrained is None else str(pretrained)
    if value.strip().lower() in NONE_VALUES:
        qg = bool(quick_gelu) if quick_gelu is not None else model.endswith("quickgelu")
        clip = build_clip(model, qg)
        source = WeightsSource("none", "none", None, qg,
                               "given" if quick_gelu is not None else "default for random init")
        return clip.eval(), source

    tag_cfg: dict | None = None
    if Path(value).is_file():
        path, kind = value, "file"
    elif _looks_like_path(value):
        raise ModelError(f"weights file {value} does not exist; pass an existing file, an "
                         f"open_clip tag of {model}, or 'none'")
    else:
        path, tag_cfg = resolve_tag(model, value, cache_dir=cache_dir, timeout=network_timeout)
        kind = "tag"

    state_dict, fmt, file_hint = read_weights(path, trust_pickle=trust_pickle)
    sha = sha256_file(path)
    if quick_gelu is not None:
        qg, why = bool(quick_gelu), "given explicitly"
    elif tag_cfg is not None:
        qg, why = bool(tag_cfg.get("quick_gelu", False)), f"open_clip's config of tag {value!r}"
    else:
        qg, why = detect_quick_gelu(path, state_dict, file_hint, sha)
    qg = qg or model.endswith("quickgelu")
    log.info("%s: %s weights from %s, QuickGELU=%s (%s)", model, fmt, path, qg, why)
    if tag_cfg is not None and (tuple(tag_cfg.get("mean", CLIP_MEAN)) != tuple(CLIP_MEAN)
                                or tuple(tag_cfg.get("std", CLIP_STD)) != tuple(CLIP_STD)):
        log.warning("tag %s of %s was trained with mean %s / std %s; cxrembed normalises with "
                    "CLIP's (%s / %s)", value, model, tag_cfg.get("mean"), tag_cfg.get("std"),
                    CLIP_MEAN, CLIP_STD)
    clip = build_clip(model, qg)
    load_state_dict_into(clip, state_dict, f"weights file {path}", model,
                         ignore_extra=fmt == "torchscript")
    return clip.eval(), WeightsSource(kind, value if kind == "tag" else str(path), sha, qg, why)
