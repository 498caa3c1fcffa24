#!/usr/bin/env bash
# Issue 6 on the H100: eviction op check on CUDA, then slimfx bench at 16K context on the
# Llama-3.2-1B shape: HF + inductor reduce-overhead (full cache) vs slimfx with H2O at
# budget 1024 (score bookkeeping on), StreamingLLM at 1024 (no bookkeeping), and slimfx
# with the full cache. Run from the repo root on the device machine.
set -u
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/slimfx && export PYTHONPATH=/tmp/p PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_checks.py -k "evict or duo" 2>&1 | tee "$OUT/check_evict_cuda.log"
common="--shape llama-3.2-1b --context 16384 --batch 1 --steps 64 --warmup 3"
python3 -m slimfx bench $common --backends inductor,slimfx --config benchmarks/configs/evict_h2o_1024.toml --output "$OUT/bench_h100_evict_h2o_1024" 2>&1 | grep -v Warning | tail -12
python3 -m slimfx bench $common --backends slimfx --config benchmarks/configs/evict_streaming_1024.toml --output "$OUT/bench_h100_evict_streaming_1024" 2>&1 | tail -8
python3 -m slimfx bench $common --backends slimfx --output "$OUT/bench_h100_full_16k" 2>&1 | tail -8
