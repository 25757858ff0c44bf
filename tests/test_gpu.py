"""Checks that need a CUDA device (skipped without one): bf16 encode agrees with fp32 on
the CPU, and an adaptation epoch runs on the GPU with autocast and channels-last."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_cuda_encode_matches_cpu_fp32(twin):
    from cxrembed.data import load_nih
    from cxrembed.data.cache import ImageSource
    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.model import load_encoder

    ds = load_nih(twin)
    x = to_clip_tensor(ImageSource(ds).read(np.arange(16)))
    torch.manual_seed(0)
    cpu = load_encoder("ViT-B-32", "none", device="cpu")
    gpu = load_encoder("ViT-B-32", "none", device="cuda")
    gpu.clip.load_state_dict(cpu.clip.state_dict())
    a = torch.nn.functional.normalize(cpu.encode_image(x), dim=-1)
    b = torch.nn.functional.normalize(gpu.encode_image(x).cpu(), dim=-1)
    assert (a * b).sum(-1).min() > 0.99


def test_adapt_epoch_on_cuda(twin, tmp_path):
    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.data import load_nih

    config = AdaptConfig.from_dict(dict(model="cxr-tiny", pretrained="none", epochs=1,
                                        workers=2, lr_encoder=1e-3, lr_head=1e-3))
    result = adapt(load_nih(twin), tmp_path / "run", config, device="cuda", progress=False)
    assert result.epochs_run == 1 and np.isfinite(result.val_mean_auc)


def test_fewshot_sweep_on_cuda_matches_cpu():
    """The mlp head and the scorer on the GPU give the CPU's numbers (same random draws)."""
    from cxrembed.fewshot import run_fewshot
    from test_fewshot import FAST, eval_data, planted

    data = eval_data(planted(1200, seed=2))
    options = dict(shots=(2, 8), seeds=2, bootstrap=100, heads=("mlp", "linear", "zeroshot"),
                   head_options=FAST)
    cpu = run_fewshot(data, **options)
    gpu = run_fewshot(data, device="cuda", **options)
    for a, b in zip(cpu.summary, gpu.summary):
        assert a["head"] == b["head"] and a["shots"] == b["shots"]
        assert abs(a["mean_auc"]["mean"] - b["mean_auc"]["mean"]) < 2e-3
        assert abs(a["mean_auc"]["ci_low"] - b["mean_auc"]["ci_low"]) < 2e-3
