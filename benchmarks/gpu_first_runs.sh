#!/usr/bin/env bash
# First CUDA runs of paths built on CPU (run from the repo root on the device machine):
# the eviction/SCOPE/duo ops against their CPU references, the KV-quant and VQ-verify
# test files on CUDA, the matmul templates against cuBLAS, and the int8 KV decode sweep.
set -u
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/slimfx && export PYTHONPATH=/tmp/p PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_checks.py -k "evict or duo" 2>&1 | tee "$OUT/check_evict_cuda.log"
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv_quant.py tests/test_vq_verify.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.log"
timeout 200 python3 benchmarks/bench_matmul_template.py --budget-s 150 --output "$OUT/bench_h100_matmul_template.json" 2>&1 | tail -40
timeout 120 python3 benchmarks/bench_kv_quant.py --sweep --output "$OUT/bench_h100_kv_quant.json" 2>&1 | tail -25
