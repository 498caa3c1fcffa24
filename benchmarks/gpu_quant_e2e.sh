#!/usr/bin/env bash
# Issue 8 on the H100: end-to-end decode, Llama-3.2-1B shape, 1K context, batch 1:
# HF + inductor reduce-overhead (bf16) and slimfx bf16 / int8 / int4-g128 weights.
set -u
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/slimfx && export PYTHONPATH=/tmp/p PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
common="--shape llama-3.2-1b --context 1024 --batch 1 --steps 64 --warmup 3"
python3 -m slimfx bench $common --backends inductor,slimfx --output "$OUT/bench_h100_quant_bf16" 2>&1 | grep "^| "
python3 -m slimfx bench $common --backends slimfx --config benchmarks/configs/quant_int8.toml --output "$OUT/bench_h100_quant_int8" 2>&1 | grep -E "^\| |rror"
python3 -m slimfx bench $common --backends slimfx --config benchmarks/configs/quant_int4_g128.toml --output "$OUT/bench_h100_quant_int4_g128" 2>&1 | grep -E "^\| |rror"
