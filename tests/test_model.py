"""cxrembed.model: loading (tag | file | none), QuickGELU, safety, partial unfreezing, head."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxrembed.errors import ConfigError, ModelError
from cxrembed.model import (AdaptedCLIP, DiagnosisHead, build_clip, count_trainable, create_clip,
                            load_encoder)

PAPER_TRAINABLE = 22_057_486


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _activation(clip: nn.Module) -> type:
    return type(clip.visual.transformer.resblocks[0].mlp.gelu)


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _tiny_weights(seed: int = 1, quick_gelu: bool = False) -> nn.Module:
    """A cxr-tiny whose weights differ from the seeded random init of pretrained='none'."""
    clip = build_clip("cxr-tiny", quick_gelu)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in clip.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return clip.eval()


# ---------------------------------------------------------------------------------------
# Partial unfreezing and the paper's parameter count


@pytest.fixture(scope="module")
def vit_b32():
    clip, source = create_clip("ViT-B-32", "none")
    return clip, source


@pytest.mark.slow
def test_vit_b32_trainable_count_is_the_papers(vit_b32):
    clip, _ = vit_b32
    model = AdaptedCLIP(clip, DiagnosisHead(), unfreeze=3)
    assert count_trainable(model) == PAPER_TRAINABLE
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = {n.split(".")[4] for n in trainable if ".resblocks." in n}
    assert blocks == {"9", "10", "11"}
    assert {"clip.visual.proj", "clip.visual.ln_post.weight", "clip.visual.ln_post.bias"} <= trainable
    assert not any(n.startswith(("clip.transformer.", "clip.token_embedding",
                                 "clip.visual.conv1", "clip.visual.ln_pre",
                                 "clip.visual.positional_embedding")) for n in trainable)
    assert "clip.logit_scale" not in trainable and "clip.text_projection" not in trainable
    # 3 blocks of width 768: 3 x 7,087,872; ln_post 1,536; proj 768 x 512; head 399,118.
    assert count_trainable(model) == 3 * 7_087_872 + 1_536 + 768 * 512 + 399_118


def _by_hand(clip: nn.Module, unfreeze: int) -> set[str]:
    """The paper's trainable set written out by name: top blocks, ln_post, proj."""
    depth = len(clip.visual.transformer.resblocks)
    blocks = {f"visual.transformer.resblocks.{i}." for i in range(depth - unfreeze, depth)}
    return {n for n, _ in clip.named_parameters()
            if n == "visual.proj" or n.startswith("visual.ln_post.")
            or any(n.startswith(b) for b in blocks)}


def _trainable(clip: nn.Module) -> set[str]:
    return {n for n, p in clip.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_partial_unfreeze_is_open_clips_lock_with_one_special_case(vit_b32):
    from cxrembed.model import apply_partial_unfreeze

    clip, _ = vit_b32
    for unfreeze in (1, 2, 3, 4):
        apply_partial_unfreeze(clip, unfreeze)
        ours = _trainable(clip)
        assert ours == _by_hand(clip, unfreeze), unfreeze
        clip.requires_grad_(False)
        clip.visual.lock(unlocked_groups=unfreeze + 1)  # open_clip's own, used as is
        assert _trainable(clip) == ours, unfreeze
    # unfreeze 0 (ln_post + proj) is no lock() setting: ln_post shares a group with the
    # last block, so lock(1) leaves ln_post frozen and lock(2) trains the whole last block.
    apply_partial_unfreeze(clip, 0)
    assert _trainable(clip) == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}
    for groups in (1, 2):
        clip.requires_grad_(False)
        clip.visual.lock(unlocked_groups=groups)
        assert _trainable(clip) != _by_hand(clip, 0), groups


def test_cxr_tiny_is_a_shipped_config_registered_through_open_clip(tmp_path):
    import json
    import tomllib

    import open_clip

    import cxrembed
    from cxrembed.model.tiny import TINY_CONFIG_FILE

    assert TINY_CONFIG_FILE.is_file() and TINY_CONFIG_FILE.parent.name == "configs"
    assert open_clip.get_model_config("cxr-tiny") == json.loads(TINY_CONFIG_FILE.read_text())
    assert "cxr-tiny" in open_clip.list_models()
    # The file travels with the package (a wheel built from pyproject.toml holds it).
    pyproject = Path(cxrembed.__file__).parents[1] / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
        package_dir = Path(cxrembed.__file__).parent / "model"
        assert any(TINY_CONFIG_FILE in package_dir.glob(pattern)
                   for pattern in data["cxrembed.model"])
    # The tiny shape cxrembed relies on: 4 blocks, a 512-d joint space, CLIP's tokenizer.
    clip = build_clip("cxr-tiny", False)
    assert len(clip.visual.transformer.resblocks) == 4 and clip.visual.proj.shape == (64, 512)
    import cxrembed.model as model_package

    assert not hasattr(model_package, "MLPHead")  # one public MLPHead: heads.mlp's trainer


@pytest.mark.slow
def test_vit_b32_one_step_changes_only_unfrozen(vit_b32):
    clip, _ = vit_b32
    model = AdaptedCLIP(clip, DiagnosisHead(), unfreeze=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    targets = torch.zeros(2, 14)
    targets[0, 3] = 1
    loss = nn.functional.binary_cross_entropy_with_logits(model(_images()), targets)
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name
        if not p.requires_grad:
            assert p.grad is None, name  # no gradient was even computed for frozen weights


def test_frozen_blocks_build_no_graph_and_match_open_clip():
    clip = _tiny_weights()
    model = AdaptedCLIP(clip, DiagnosisHead(), unfreeze=2)  # all but the top 2 blocks frozen
    seen = {}
    blocks = clip.visual.transformer.resblocks
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out.requires_grad))
    x = _images()
    out = model.embed(x)
    assert seen == {0: False, 1: False, 2: True, 3: True}
    with torch.no_grad():
        reference = clip.encode_image(x)
    # Same values (attention kernels differ with autograd on: float rounding only).
    torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-6)
    assert out.requires_grad


def test_unfreeze_larger_than_depth_is_refused():
    clip = build_clip("cxr-tiny", False)
    with pytest.raises(ConfigError, match=r"--unfreeze 5 .* 4 blocks; use 0\.\.4"):
        AdaptedCLIP(clip, DiagnosisHead(), unfreeze=5)
    model = AdaptedCLIP(clip, DiagnosisHead(), unfreeze=0)  # 0: ln_post and proj only
    assert count_trainable(model) == 2 * 64 + 64 * 512 + 399_118


# ---------------------------------------------------------------------------------------
# The head


def test_head_is_the_papers_mlp():
    head = DiagnosisHead()
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Linear, nn.LayerNorm,
                     nn.GELU, nn.Dropout, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]
    assert shapes == [(512, 512), (512, 256), (256, 14)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.3, 0.2]
    assert sum(p.numel() for p in head.parameters()) == 399_118
    # Kaiming normal (fan-in, gain sqrt 2), not PyTorch's default kaiming-uniform(a=sqrt 5):
    w = head[0].weight.detach().double().ravel()
    assert abs(w.std().item() / np.sqrt(2 / 512) - 1) < 0.02
    kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item() - 3
    assert abs(kurtosis) < 0.1  # uniform would be -1.2
    assert all(torch.count_nonzero(m.bias) == 0 for m in head if isinstance(m, nn.Linear))
    head.eval()
    assert head(torch.randn(5, 512)).shape == (5, 14)


# ---------------------------------------------------------------------------------------
# Loading from files


def test_state_dict_and_safetensors_files_reproduce_outputs(tmp_path):
    from safetensors.torch import save_file

    clip = _tiny_weights()
    state = clip.state_dict()
    torch.save(state, tmp_path / "tiny.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "train_ckpt.pt")  # open_clip training checkpoint layout
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tiny.safetensors"))
    x = _images()
    prompts = ["a chest x-ray showing effusion", "no effusion"]
    for p in clip.parameters():  # as the Encoder runs it: frozen (kernel choice depends on it)
        p.requires_grad_(False)
    with torch.inference_mode():
        want_image = clip.encode_image(x)
        want_text = clip.encode_text(__import__("open_clip").get_tokenizer("cxr-tiny")(prompts))
    for name in ("tiny.pt", "train_ckpt.pt", "tiny.safetensors"):
        enc = load_encoder("cxr-tiny", tmp_path / name)
        torch.testing.assert_close(enc.encode_image(x), want_image, rtol=0, atol=0)
        torch.testing.assert_close(enc.encode_text(prompts), want_text, rtol=0, atol=0)
        assert enc.source.kind == "file" and not enc.source.quick_gelu
    none_a, none_b = load_encoder("cxr-tiny", "none"), load_encoder("cxr-tiny", "none")
    assert none_a.fingerprint == none_b.fingerprint  # seeded random init
    torch.testing.assert_close(none_a.encode_image(x), none_b.encode_image(x), rtol=0, atol=0)
    assert load_encoder("cxr-tiny", tmp_path / "tiny.pt").fingerprint != none_a.fingerprint


def test_pickled_code_is_refused_without_trust(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    state = _tiny_weights().state_dict()
    torch.save({"state_dict": state, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="trust_pickle=True") as info:
        create_clip("cxr-tiny", tmp_path / "evil.pt")
    assert "run code" in str(info.value)
    assert not marker.exists()
    clip, _ = create_clip("cxr-tiny", tmp_path / "evil.pt", trust_pickle=True)
    assert marker.exists()  # the user asked for it
    torch.testing.assert_close(clip.state_dict()["visual.proj"], state["visual.proj"])


def _openai_style_torchscript(path: Path) -> nn.Module:
    """A TorchScript archive laid out like OpenAI's release: QuickGELU, fp16 weights with
    fp32 LayerNorms."""
    from open_clip.model import convert_weights_to_fp16

    clip = _tiny_weights(seed=2, quick_gelu=True)
    convert_weights_to_fp16(clip)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(clip).save(str(path))
    return clip.float().eval()


def test_openai_torchscript_loads_without_running_it_with_quickgelu(tmp_path, monkeypatch):
    reference = _openai_style_torchscript(tmp_path / "ViT-tiny.pt")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load must not run on an untrusted file")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    enc = load_encoder("cxr-tiny", tmp_path / "ViT-tiny.pt")
    assert enc.source.quick_gelu and "TorchScript" in enc.source.quick_gelu_reason
    assert _activation(enc.clip).__name__ == "QuickGELU"
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(x), reference.encode_image(x))


def test_openai_style_state_dict_gets_quickgelu(tmp_path):
    from open_clip.model import convert_weights_to_fp16

    clip = _tiny_weights(seed=3)
    plain = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.save(plain, tmp_path / "plain.pt")
    convert_weights_to_fp16(clip)  # OpenAI's checkpoints: fp16 except LayerNorms
    torch.save(clip.state_dict(), tmp_path / "mixed.pt")
    torch.save({**plain, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, tmp_path / "openai_keys.pt")
    for name, want in (("plain.pt", False), ("mixed.pt", True), ("openai_keys.pt", True)):
        loaded, source = create_clip("cxr-tiny", tmp_path / name)
        assert source.quick_gelu is want, name
        assert (_activation(loaded).__name__ == "QuickGELU") is want, name
    forced, source = create_clip("cxr-tiny", tmp_path / "plain.pt", quick_gelu=True)
    assert source.quick_gelu and _activation(forced).__name__ == "QuickGELU"


def test_tags_apply_their_quickgelu_setting(tmp_path, monkeypatch):
    """Tags load from the Hugging Face cache without network; QuickGELU follows the tag."""
    from open_clip import pretrained
    from safetensors.torch import save_file

    monkeypatch.setitem(pretrained._PRETRAINED, "cxr-tiny", {
        "openai_like": pretrained._pcfg(hf_hub="cxrembed-test/tiny-quick/", quick_gelu=True),
        "laion_like": pretrained._pcfg(hf_hub="cxrembed-test/tiny-gelu/"),
    })
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a network access would fail the test
    state = {k: v.contiguous() for k, v in _tiny_weights().state_dict().items()}
    for repo in ("tiny-quick", "tiny-gelu"):
        snapshot = tmp_path / f"models--cxrembed-test--{repo}" / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        save_file(state, str(snapshot / "open_clip_model.safetensors"))
    quick, source = create_clip("cxr-tiny", "openai_like", cache_dir=str(tmp_path))
    assert source.kind == "tag" and source.quick_gelu
    assert _activation(quick).__name__ == "QuickGELU"
    gelu, source = create_clip("cxr-tiny", "laion_like", cache_dir=str(tmp_path))
    assert not source.quick_gelu and _activation(gelu) is nn.GELU
    # The real registry: OpenAI's ViT-B-32 tag is a QuickGELU one.
    assert pretrained.get_pretrained_cfg("ViT-B-32", "openai")["quick_gelu"] is True


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as info:
        create_clip("ViT-B-23", "none")
    text = str(info.value)
    assert "'ViT-B-23'" in text and "ViT-B-32" in text and "cxr-tiny" in text
    assert "Did you mean" in text and "ViT-L-14" in text


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(ModelError, match="laion2b_s34b_b79k"):
        create_clip("ViT-B-32", "laion9000")
    with pytest.raises(ModelError, match="does not exist"):
        create_clip("cxr-tiny", "/no/such/weights.pt")


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(_tiny_weights().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ModelError) as info:
        create_clip("ViT-B-32", tmp_path / "tiny.pt")
    text = str(info.value)
    assert "does not fit --model ViT-B-32" in text and "shape mismatch" in text
    assert "width 64, 4 blocks, patch 32" in text and "--model cxr-tiny" in text


def _blackhole() -> tuple[socket.socket, int]:
    """A local server that accepts connections and never answers (a hung network)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)],
                     daemon=True).start()
    return server, server.getsockname()[1]


def test_offline_tag_fails_fast_with_a_hint(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE.*--pretrained /path/to/weights"):
        create_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 2

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    server, port = _blackhole()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        start = time.perf_counter()
        with pytest.raises(ModelError) as info:
            create_clip("ViT-B-32", "openai", cache_dir=str(tmp_path), network_timeout=1.0)
        elapsed = time.perf_counter() - start
    finally:
        server.close()
    assert elapsed < 4, elapsed
    text = str(info.value)
    assert "not reachable" in text and "ViT-B-32.pt" in text and "--pretrained" in text
