#!/usr/bin/env bash
# The whole GPU run of issue 10, as one command (device time is short).
# Ours in bfloat16 (float32 params), conv_impl split and native, against timm
# under bf16 autocast in NCHW and channels_last; F0 at 192 px, batches 64,
# 128 and 256; img/s, ratios, MFU against the chip's dense bf16 peak and the
# measured matmul rate, peak device memory. Writes benchmarks/results/.
#   bash benchmarks/gpu_run.sh                       # on the GPU machine
#   bash benchmarks/gpu_run.sh --size 64 --batches 2 --repeats 2  # CPU check
set -euo pipefail
cd "$(dirname "$0")/.."
out="${NFNETS_BENCH_OUT:-benchmarks/results/gpu_f0_192.md}"
mkdir -p "$(dirname "$out")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  2>/dev/null || echo "no nvidia-smi: not a GPU machine"
python -c "import jax; print('jax devices:', jax.devices())"
python benchmarks/throughput.py --conv-impl split native \
  --timm-formats nchw channels_last --dtype bfloat16 --out "$out" "$@"
