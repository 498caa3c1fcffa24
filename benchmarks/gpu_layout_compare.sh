#!/usr/bin/env bash
# An older tree against this one on the same warm GPU, one after the other: decode and
# prefill of `slimfx bench` on the Llama-3.2-1B shape with the full cache at 1K and 16K,
# then H2O at a 1024-token budget and int8 KV at 16K (the attention variants).
# Usage (repo root on the device machine):
#   OLD=.oldtree/old.tar bash benchmarks/gpu_layout_compare.sh   # OLD: `git archive` of the older commit
set -u
OUT=${OUT:-/tmp/out}
NEW=$PWD
mkdir -p /tmp/trees/new /tmp/trees/old/slimfx "$OUT"
ln -sfn "$NEW" /tmp/trees/new/slimfx
tar -xf "$OLD" -C /tmp/trees/old/slimfx
export PYTHONUNBUFFERED=1
bench() {
  local tree=$1; shift
  (cd /tmp/trees/$tree && PYTHONPATH=/tmp/trees/$tree timeout "${LIMIT:-280}" python3 -m slimfx bench --batch 1 --steps 64 \
    --warmup 3 --codegen slimfx --backends slimfx --shape llama-3.2-1b "$@" 2>&1 | grep -E "^\| |rror|Traceback" | sed "s/^/$tree /")
}
for ctx in 1024 16384; do
  for tree in old new; do bench $tree --context $ctx --output "$OUT/layout_${tree}_${ctx}"; done
done
for cfg in evict_h2o_1024 quant_kv_int8; do
  for tree in old new; do bench $tree --context 16384 --config "$NEW/benchmarks/configs/$cfg.toml" --output "$OUT/layout_${tree}_16k_$cfg"; done
done
