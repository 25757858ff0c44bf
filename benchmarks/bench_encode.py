"""Encode pipeline efficiency: end-to-end images/s over forward-only images/s, same batches.

For each (model, image source) it times, in one run, on the same images and batch size:

- forward-only: the encoder on batches already decoded and normalised in memory (the
  best the pipeline could do);
- end-to-end: ``encode_dataset`` (read-ahead threads reading the pixel cache or decoding
  PNGs, the model, float16 conversion, chunked HDF5 writes). ``loop`` is the encoding loop
  (what ``EncodeResult.images_per_s`` reports); ``total`` also counts creating the store,
  encoding the prompts and building the flat index, fixed costs that vanish at NIH size.

Target: loop efficiency >= 0.9 (decoding must not stall the model). Images are a
1024 px synthetic twin (the NIH size, so PNG decoding costs what it does on the real
release). Each end-to-end pass is paired with a forward-only pass just before it, and the
median of ``--repeat`` pair ratios is printed (with their range): on a shared machine the
load of other work changes between passes.

    python benchmarks/bench_encode.py [--images 64] [--batch-size 32] [--repeat 7]
        [--models ViT-B-32 cxr-tiny] [--sources cache png] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import cxrembed  # noqa: F401  (first: it sets passive OpenMP waits before torch starts)
import torch  # noqa: E402


def forward_only(encoder, batches: list[torch.Tensor]) -> float:
    """images/s of the encoder (and its head) alone on in-memory batches."""
    n = sum(len(b) for b in batches)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            emb = encoder.encode_image(x)
            if encoder.has_head:
                encoder.head_logits(emb)
            emb.float().cpu()
    return n / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024, help="side of the twin's PNGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=7,
                        help="alternating forward-only / end-to-end pairs per source")
    parser.add_argument("--workers", type=int, default=2, help="read-ahead threads")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "cxr-tiny"])
    parser.add_argument("--sources", nargs="+", default=["cache", "png"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=None,
                        help="an NIH folder to use instead of a synthetic twin")
    parser.add_argument("--cache", type=Path, default=None, help="its pixel cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from cxrembed.data.cache import ImageSource, build_pixel_cache
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin
    from cxrembed.data.transforms import to_clip_tensor
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        if args.data:
            dataset = load_nih(args.data, missing="drop")
        else:
            root = make_twin(tmp / "twin", images=args.images, size=args.size, seed=0)
            dataset = load_nih(root)
        dataset = dataset.subset(np.arange(min(args.images, len(dataset))))
        cache = args.cache
        if "cache" in args.sources and cache is None:
            began = time.perf_counter()
            cache = build_pixel_cache(dataset, tmp / "pixels.h5", progress=False)
            print(f"pixel cache of {len(dataset)} images built in "
                  f"{time.perf_counter() - began:.1f} s")
        print(f"{len(dataset)} images ({'real' if args.data else f'{args.size} px twin'}), "
              f"batch {args.batch_size}, {args.workers} read-ahead threads, device "
              f"{args.device}, torch threads {torch.get_num_threads()}")
        pixels = ImageSource(dataset, cache_path=cache).read(np.arange(len(dataset)))
        print(f"{'model':<10} {'source':<6} {'forward img/s':>14} {'loop img/s':>11} "
              f"{'total img/s':>12} {'loop eff.':>9} {'total eff.':>10} {'loop range':>11}")
        for model in args.models:
            encoder = load_encoder(model=model, pretrained="none", device=args.device)
            batches = [to_clip_tensor(pixels[i:i + args.batch_size], device=args.device)
                       for i in range(0, len(pixels), args.batch_size)]
            # Warm up until steady: the first passes of a CPU model run many times slower
            # (oneDNN kernel selection, allocator growth).
            previous = forward_only(encoder, batches)
            for _ in range(6):
                rate = forward_only(encoder, batches)
                if abs(rate - previous) < 0.1 * previous:
                    break
                previous = rate
            runs = {source: {"fwd": [], "loop": [], "total": []} for source in args.sources}
            for r in range(args.repeat):  # sources interleaved, so each sees the same load
                for source in args.sources:
                    run = runs[source]
                    run["fwd"].append(forward_only(encoder, batches))
                    out = tmp / f"{model}-{source}-{r}.h5"
                    began = time.perf_counter()
                    result = encode_dataset(dataset, out, encoder, batch_size=args.batch_size,
                                            pixel_cache=cache if source == "cache" else None,
                                            workers=args.workers, progress=False,
                                            overwrite=True)
                    run["total"].append(len(dataset) / (time.perf_counter() - began))
                    run["loop"].append(result.images_per_s)
                    out.unlink()
            for source, run in runs.items():
                # Each end-to-end pass is compared with the forward-only pass just before it
                # (the same load from whatever else runs on the machine); medians of those.
                loop_eff = [a / b for a, b in zip(run["loop"], run["fwd"])]
                total_eff = [a / b for a, b in zip(run["total"], run["fwd"])]
                f, lo, to = (statistics.median(run[k]) for k in ("fwd", "loop", "total"))
                spread = f"{min(loop_eff):.2f}-{max(loop_eff):.2f}"
                print(f"{model:<10} {source:<6} {f:>14.1f} {lo:>11.1f} {to:>12.1f} "
                      f"{statistics.median(loop_eff):>9.3f} {statistics.median(total_eff):>10.3f} "
                      f"{spread:>11}", flush=True)
            del encoder, batches
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
