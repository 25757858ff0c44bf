"""Decode images/s per core for each decoder on real-size (1024×1024) PNGs, and the pixel
cache build rate with all cores.

Uses the 33 real NIH images of ../shared/nih/sample when present, else a 1024 px synthetic
twin. Every decoder runs on the same files in the same run; the ratio to the PIL reference
is printed, and so is each decoder's largest pixel difference from the reference.

    python benchmarks/bench_decode.py [--images N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrembed.data.images import decode

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "nih" / "sample"


def _reduced(path: str) -> np.ndarray:
    """A candidate: OpenCV's reduced-size read (nearest-like 1/2 subsampling) + area resize."""
    import cv2

    from cxrembed.data.images import _resize_crop

    return _resize_crop(cv2.imread(path, cv2.IMREAD_REDUCED_GRAYSCALE_2), 224)


def _plain_pil(path: str) -> np.ndarray:
    """What most code does: PIL decode, convert to L, PIL's antialiased bicubic resize."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((224, 224), Image.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images when no sample")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)  # per core
    tmp = Path(tempfile.mkdtemp())
    try:
        if SAMPLE.is_dir():
            paths = sorted(str(p) for p in (SAMPLE / "images").glob("*.png"))
            source = f"{len(paths)} real NIH PNGs (1024x1024) from {SAMPLE}"
        else:
            from cxrembed.data.synth import make_twin

            twin = make_twin(tmp / "twin", images=max(args.images, 20), size=1024, seed=0)
            paths = sorted(str(p) for p in (twin / "images_001" / "images").glob("*.png"))
            source = f"{len(paths)} synthetic 1024x1024 PNGs"
        print(f"cxrembed decode benchmark on {source}; 1 thread per decoder")
        decoders = {
            "pil (reference)": lambda p: decode(p, decoder="pil"),  # PIL decode, area resize
            "opencv (default)": lambda p: decode(p, decoder="opencv"),
            "opencv reduced-2": _reduced,
            "plain PIL resize": _plain_pil,
        }
        reference = [decode(p, decoder="pil").astype(int) for p in paths]
        rates = {}
        for name, fn in decoders.items():
            fn(paths[0])
            start = time.perf_counter()
            for _ in range(args.repeat):
                out = [fn(p) for p in paths]
            elapsed = time.perf_counter() - start
            rates[name] = args.repeat * len(paths) / elapsed
            diff = max(np.abs(o.astype(int) - r).max() for o, r in zip(out, reference))
            mean = np.mean([np.abs(o.astype(int) - r).mean() for o, r in zip(out, reference)])
            print(f"  {name:18s} {rates[name]:7.1f} images/s/core   "
                  f"x{rates[name] / rates['pil (reference)']:.2f} vs pil   "
                  f"max |diff| {diff:3d}, mean |diff| {mean:.2f} grey levels")

        # Cache build rate with every core, on the same files repeated to a few hundred rows.
        from cxrembed.data.cache import build_pixel_cache
        from cxrembed.data.nih import NIHDataset

        n = max(256, len(paths))
        rows = np.arange(n) % len(paths)
        ds = NIHDataset(root=tmp, image_id=np.array([f"{i:08d}_000.png" for i in range(n)]),
                        patient_id=np.arange(n), follow_up=np.zeros(n, int),
                        labels=np.zeros((n, 14), np.uint8), view=np.full(n, "PA"),
                        age=np.zeros(n, np.float32), sex=np.full(n, "M"),
                        split=np.full(n, "train"), path=np.array(paths)[rows])
        workers = os.cpu_count() or 1
        start = time.perf_counter()
        build_pixel_cache(ds, tmp / "px.h5", workers=workers, progress=False)
        rate = n / (time.perf_counter() - start)
        print(f"  pixel cache build: {rate:7.1f} images/s with {workers} worker processes "
              f"({rate / workers:.1f}/core); NIH's 112,120 images would take "
              f"{112_120 / rate / 60:.0f} min here")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
