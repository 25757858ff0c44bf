"""Decode images/s per core for each decoder on real-size (1024×1024) PNGs, and the pixel
cache build rate with all cores against its ceiling, the same worker processes decoding
the same blocks and keeping nothing (and the build of ``--baseline``), in the same run.

Uses the 33 real NIH images of ../shared/nih/sample when present, else a 1024 px synthetic
twin. Every decoder runs on the same files in the same run; the ratio to the PIL reference
is printed, and so is each decoder's largest pixel difference from the reference.

    python benchmarks/bench_decode.py [--images N] [--repeat R] [--cache-images N]
                                      [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
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


def _cpu() -> np.ndarray:
    """CPU seconds of this process and of its ended children (the pool's workers)."""
    import resource

    own, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return np.array([own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime])


def _decode_blocks(paths: list[str]) -> int:
    for p in paths:
        decode(p)
    return len(paths)


def _decode_only(paths: np.ndarray, workers: int) -> None:
    """The ceiling: the same worker processes decoding the same blocks, keeping nothing."""
    from cxrembed.data.cache import BLOCK, _pool

    with _pool(workers) as pool:
        list(pool.map(_decode_blocks, [list(paths[i:i + BLOCK])
                                       for i in range(0, len(paths), BLOCK)]))


def _baseline_build(rev: str):
    """build_pixel_cache as it was at git revision ``rev`` (its module alone, read with git
    show: no second copy of the code in the repository)."""
    import importlib.util
    import subprocess

    source = subprocess.run(["git", "show", f"{rev}:cxrembed/data/cache.py"],
                            cwd=Path(__file__).resolve().parent, capture_output=True,
                            text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("cxrembed_cache_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickling its worker function needs the module
    exec(compile(source, f"{rev}:cxrembed/data/cache.py", "exec"), module.__dict__)
    return module.build_pixel_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images when no sample")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache-images", type=int, default=512,
                        help="rows of the pixel cache built (the sample repeated)")
    parser.add_argument("--baseline", default="588b599",
                        help="git revision whose cache build is timed too ('' to skip)")
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

        n = max(args.cache_images, len(paths))
        rows = np.arange(n) % len(paths)
        workers = os.cpu_count() or 1
        ds = NIHDataset(root=tmp, image_id=np.array([f"{i:08d}_000.png" for i in range(n)]),
                        patient_id=np.arange(n), follow_up=np.zeros(n, int),
                        labels=np.zeros((n, 14), np.uint8), view=np.full(n, "PA"),
                        age=np.zeros(n, np.float32), sex=np.full(n, "M"),
                        split=np.full(n, "train"), path=np.array(paths)[rows])
        old_build = _baseline_build(args.baseline) if args.baseline else None
        rates = {}
        for _ in range(args.repeat):  # interleaved, best of each: the cores are shared
            for name, run in (("decode only", lambda: _decode_only(ds.path, workers)),
                              ("build (this tree)", lambda: build_pixel_cache(
                                  ds, tmp / "px.h5", workers=workers, progress=False,
                                  overwrite=True)),
                              *((("build (" + args.baseline + ")", lambda: old_build(
                                  ds, tmp / "px_old.h5", workers=workers, progress=False,
                                  overwrite=True)),) if old_build else ())):
                start, cpu = time.perf_counter(), _cpu()
                run()
                wall, (parent, children) = time.perf_counter() - start, _cpu() - cpu
                if n / wall > rates.get(name, (0.0,))[0]:
                    rates[name] = (n / wall, 1000 * parent / n, 1000 * children / n)
        ceiling = rates["decode only"][0]
        print(f"  pixel cache, {n} images, {workers} worker processes (best of {args.repeat}, "
              "interleaved); CPU ms per image in the parent and in the workers:")
        for name, (rate, parent, children) in rates.items():
            print(f"    {name:24s} {rate:7.1f} images/s  {rate / ceiling:5.2f} of decode only   "
                  f"parent {parent:5.2f} ms  workers {children:5.2f} ms")
        rate = rates["build (this tree)"][0]
        print(f"  NIH's 112,120 images would take {112_120 / rate / 60:.0f} min here")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
