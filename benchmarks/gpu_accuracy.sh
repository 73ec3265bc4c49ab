#!/usr/bin/env bash
# Single-GPU validation (one command, on a machine with a CUDA GPU):
#   bash benchmarks/gpu_accuracy.sh OUT_DIR [accuracy.py options...]
# 1. the GPU tests (CUDA expert FFN vs CPU; NCCL self-check where 2 GPUs are visible);
# 2. benchmarks/accuracy.py on NCCL at world size 1 with the small-gpu model: `moesim
#    calibrate` on CUDA right before each configuration (compute, memory and host parameters
#    measured; links copied from the H100 preset: one rank has no collective to time), then
#    the executor (CUDA events) and the simulator on the same trace slice.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_accuracy.sh OUT_DIR [accuracy.py options]}
shift
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/gpu.txt"
python3 -m pytest -q -m gpu tests/executor/test_executor_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
python3 benchmarks/accuracy.py --out "$out/accuracy" --backend nccl --world-sizes 1 \
    --model small-gpu --quiet-wait-s 0 "$@" 2>&1 | tee "$out/accuracy.txt"
