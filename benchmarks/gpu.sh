#!/usr/bin/env bash
# GPU checks and timings, in one call, for a machine with a CUDA GPU (written for the
# lent H200; works on any CUDA box). Prints everything; copy the output into the "GPU"
# section of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh            # from the repository root
#
# Where open_clip / faiss / h5py are not installed (a bare GPU machine without internet),
# put their wheels in .whl/ first (see the device notes) and this script installs them
# into /tmp/site. It measures:
#   1. adaptation: training images/s of the partial model vs full fine-tune vs forward,
#      and one real training epoch from a pixel cache (target >= 3,000 images/s)
#   2. encode: images/s from the pixel cache with bf16 (target >= 5,000 images/s)
#   3. the GPU-marked tests
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="${PYTHONPATH:-}:$PWD"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
echo "== 1. adaptation step ratios (batch 256, bf16) and one epoch from the pixel cache"
python3 benchmarks/bench_adapt.py --device cuda --models ViT-B-32 --epoch-images 20000
echo "== 2. encode from the pixel cache (bf16)"
python3 benchmarks/bench_encode.py --device cuda --models ViT-B-32 --sources cache \
    --images 4096 --size 256 --batch-size 512 --repeat 3
echo "== 3. GPU tests"
python3 -m pytest -q -m gpu tests || [ $? -eq 5 ]   # 5: no test selected
