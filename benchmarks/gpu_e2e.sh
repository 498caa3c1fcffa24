#!/usr/bin/env bash
# End-to-end decode through `slimfx bench` on the H100, slimfx's own code generator
# (--codegen slimfx) against HF + inductor reduce-overhead (StaticCache), batch 1.
#   part 1: Llama-3.2-1B shape at 1K: passes off (issue 5), int8 / int4-g128 weights (issue 8)
#   part 2: 16K context: full cache on both shapes (issue 5), H2O and DuoAttention at
#           budget 1024 on the Llama shape (issue 6)
#   part 3: Llama-3.1-8B shape at 1K: bf16, int8, int4-g128 (issue 8)
#   part 4: CUDA checks of the fused cat (rotary) kernels, then passes off at 1K on both
#           shapes (issue 5)
#   part 5: prefill of 2K and 8K tokens (and decode there), passes off, both shapes (issue 5)
#   part 6: where the decode step's time goes (kernel profile, Llama-3.2-1B shape, 1K)
#   part 7: CUDA checks of this session's kernels, then decode at 1K on both shapes
#           (cold-L2 autotuning, two-stage argmax) and the decode profile
# Usage (repo root on the device machine): bash benchmarks/gpu_e2e.sh 1|2|3
set -u
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/slimfx && export PYTHONPATH=/tmp/p PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
bench() { timeout "${LIMIT:-280}" python3 -m slimfx bench --batch 1 --steps 64 --warmup 3 --codegen slimfx "$@" 2>&1 | grep -E "^\| |rror|Traceback" ; }
case "${1:-1}" in
1)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
  c="--shape llama-3.2-1b --context 1024"
  bench $c --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama1b_1k"
  bench $c --backends slimfx --config benchmarks/configs/quant_int8.toml --output "$OUT/bench_h100_e2e_llama1b_1k_int8"
  bench $c --backends slimfx --config benchmarks/configs/quant_int4_g128.toml --output "$OUT/bench_h100_e2e_llama1b_1k_int4_g128"
  ;;
2)
  c="--shape llama-3.2-1b --context 16384"
  python3 benchmarks/make_synthetic_duo_heads.py --shape llama-3.2-1b --out /tmp/duo_heads_synthetic.safetensors
  bench $c --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama1b_16k"
  bench $c --backends slimfx --config benchmarks/configs/evict_h2o_1024.toml --output "$OUT/bench_h100_e2e_llama1b_16k_h2o_1024"
  bench $c --backends slimfx --config benchmarks/configs/duo_1024_synthetic.toml --output "$OUT/bench_h100_e2e_llama1b_16k_duo_1024"
  bench --shape smollm2-135m --context 16384 --backends inductor,slimfx --output "$OUT/bench_h100_e2e_smollm2_16k"
  ;;
3)
  c="--shape llama-3.1-8b --context 1024"
  bench $c --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama8b_1k"
  bench $c --backends slimfx --config benchmarks/configs/quant_int8.toml --output "$OUT/bench_h100_e2e_llama8b_1k_int8"
  bench $c --backends slimfx --config benchmarks/configs/quant_int4_g128.toml --output "$OUT/bench_h100_e2e_llama8b_1k_int4_g128"
  ;;
4)
  python3 -m pytest -q -p no:cacheprovider tests/test_codegen_pointwise.py tests/test_codegen_matmul.py tests/test_kernels_evict_write.py -k "cuda or kernel_matches" 2>&1 | tail -2
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_checks.py -k prefill_cudagraphs 2>&1 | tail -2
  bench --shape llama-3.2-1b --context 1024 --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama1b_1k_catfused"
  bench --shape smollm2-135m --context 1024 --backends inductor,slimfx --output "$OUT/bench_h100_e2e_smollm2_1k"
  ;;
5)
  for ctx in 2048 8192; do
    bench --shape llama-3.2-1b --context $ctx --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama1b_prefill_$ctx"
    bench --shape smollm2-135m --context $ctx --backends inductor,slimfx --output "$OUT/bench_h100_e2e_smollm2_prefill_$ctx"
  done
  ;;
6)
  python3 benchmarks/profile_runtime_prefill.py --shape llama-3.2-1b --context 1024 --decode-steps 32 2>&1 | grep -v -i warn
  ;;
7)
  python3 -m pytest -q -p no:cacheprovider tests/test_codegen_pointwise.py tests/test_codegen_matmul.py tests/test_codegen_autotune.py tests/test_kernels_attention.py -k "cuda or cold_l2 or prefill" 2>&1 | tail -2
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_checks.py -k prefill_cudagraphs 2>&1 | tail -2
  bench --shape llama-3.2-1b --context 1024 --backends inductor,slimfx --output "$OUT/bench_h100_e2e_llama1b_1k_v4"
  bench --shape smollm2-135m --context 1024 --backends inductor,slimfx --output "$OUT/bench_h100_e2e_smollm2_1k_v4"
  python3 benchmarks/profile_runtime_prefill.py --shape llama-3.2-1b --context 1024 --decode-steps 32 2>&1 | grep -v -i warn | head -14
  rm -f "$OUT"/*.png
  ;;
esac
