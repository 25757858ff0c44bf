"""Training speed of partial adaptation against a full fine-tune and a forward-only pass.

    python benchmarks/bench_adapt.py [--quick] [--models ViT-B-32,cxr-tiny] [--batch 8]
                                     [--steps 5] [--device cpu] [--threads N]
                                     [--epoch-images N]

For each model (random init, ``pretrained=none``: speed does not depend on the weights),
on the same batch in the same run, three ways of processing it are timed, interleaved so
that a busy machine slows all three alike:

* ``partial``: one optimiser step of the paper's set-up (top 3 visual blocks + ln_post +
  proj + head train; the frozen bottom runs under no_grad);
* ``full``: one optimiser step with every image-tower weight trainable (full fine-tune);
* ``forward``: inference only (``encode_image`` + head), the floor for any training step.

Images/s are medians over ``--steps`` timed repetitions after one warm-up; the ratios are
what to compare across machines. With ``--epoch-images N`` it also times one real training
epoch of ``cxrembed.adapt`` over a pixel cache of an N-image synthetic twin (the figure the
issue targets on a GPU: >= 3,000 images/s for ViT-B-32 on an H200).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setups(model_name: str, device: torch.device, amp: bool):
    from cxrembed.model import AdaptedCLIP, DiagnosisHead, count_trainable, create_clip
    from cxrembed.model.loss import focal_bce_with_logits

    clip, _ = create_clip(model_name, "none")
    torch.manual_seed(0)
    model = AdaptedCLIP(clip, DiagnosisHead(in_dim=int(clip.visual.proj.shape[1])), unfreeze=3)
    model.to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else (
        lambda: torch.autocast("cpu", enabled=False))

    def partial_params() -> list[torch.nn.Parameter]:
        model.freeze()
        return [p for p in model.parameters() if p.requires_grad]

    def full_params() -> list[torch.nn.Parameter]:
        model.freeze()
        for p in model.clip.visual.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    counts = {}
    params = {"partial": partial_params(), "full": full_params()}
    optimizers = {k: torch.optim.AdamW(v, lr=1e-5) for k, v in params.items()}
    for mode in ("partial", "full"):
        (partial_params if mode == "partial" else full_params)()
        counts[mode] = count_trainable(model)
    counts["forward"] = 0

    def step(mode: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if mode == "forward":
            model.eval()
            with torch.inference_mode(), autocast():
                model.head(model.clip.encode_image(x))
            return
        (partial_params if mode == "partial" else full_params)()
        model.train()
        with autocast():
            logits = model(x) if mode == "partial" else model.head(model.clip.encode_image(x))
        loss = focal_bce_with_logits(logits, y)
        optimizers[mode].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params[mode], 1.0)
        optimizers[mode].step()

    return step, counts


def bench_steps(model_name: str, batch: int, steps: int, device: torch.device, amp: bool) -> None:
    step, counts = _setups(model_name, device, amp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    y = (torch.rand(batch, 14, generator=g) < 0.1).float().to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    modes = ("partial", "full", "forward")
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, float] = {}
    for repeat in range(steps + 1):  # the first round warms up
        for mode in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            step(mode, x, y)
            _sync(device)
            if repeat:
                times[mode].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[mode] = torch.cuda.max_memory_allocated(device) / 2**30
    rate = {m: batch / statistics.median(times[m]) for m in modes}
    print(f"{model_name}, batch {batch}, {steps} timed steps, {device}"
          f"{' bf16' if amp else ''}, {torch.get_num_threads()} threads:")
    for mode in modes:
        extra = f", peak {peak[mode]:.2f} GiB" if mode in peak else ""
        print(f"  {mode:8s} {rate[mode]:9.1f} img/s  ({counts[mode]:>11,} trainable{extra})")
    print(f"  partial / full step speed: {rate['partial'] / rate['full']:.2f}x; "
          f"partial step / forward-only: {rate['partial'] / rate['forward']:.2f} of its speed")


def bench_epoch(model_name: str, images: int, device: torch.device, batch: int) -> None:
    from cxrembed.adapt import AdaptConfig, adapt
    from cxrembed.data.cache import build_pixel_cache
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin

    with tempfile.TemporaryDirectory() as tmp:
        root = make_twin(Path(tmp) / "nih", images=images, size=64, seed=0)
        dataset = load_nih(root, val_fraction=0.05)
        cache = build_pixel_cache(dataset, Path(tmp) / "pixels.h5", progress=False)
        config = AdaptConfig(model=model_name, pretrained="none", epochs=1, batch_size=batch,
                             workers=4 if device.type == "cuda" else 0)
        start = time.perf_counter()
        result = adapt(dataset, Path(tmp) / "run", config, pixel_cache=cache,
                       device=str(device), progress=False)
        took = time.perf_counter() - start
    record = result.history[0]
    print(f"{model_name}: one training epoch of {len(dataset.split_rows('train')):,} images from "
          f"the pixel cache on {device}: {record['images_per_s']:,.0f} img/s "
          f"({record['train_seconds']:.1f} s; whole run with val/test/saving {took:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller batch")
    parser.add_argument("--models", default="ViT-B-32,cxr-tiny")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (CPU) / 256 (CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--epoch-images", type=int, default=0,
                        help="also time one adapt epoch over an N-image twin's pixel cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (4 if args.quick else 8) * (32 if device.type == "cuda" else 1)
    steps = args.steps or (2 if args.quick else 5)
    amp = device.type == "cuda" and not args.no_amp
    for name in args.models.split(","):
        bench_steps(name, batch, steps, device, amp)
    if args.epoch_images:
        for name in args.models.split(","):
            bench_epoch(name, args.epoch_images, device, 256 if device.type == "cuda" else 32)


if __name__ == "__main__":
    main()
