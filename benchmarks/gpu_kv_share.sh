#!/usr/bin/env bash
# Cross-layer KV sharing on the GPU: KV bytes and decode time per configuration against
# HF eager and HF + inductor, one machine, one script run (Llama-3.2-1B shape, random
# weights: speed and bytes do not depend on the values, so KVSharer's calibrated maps,
# which exist only for a real model, run as fast as the adjacent pairs of the same count).
#   configurations: slimfx without sharing; adjacent pairs (a reader reads the layer below)
#   at 10/20/30% of the layers reading; MiniCache merged pairs (pattern upper) at the same
#   shares.
# Environment: SHAPE, CONTEXT, BATCH, STEPS, WARMUP, DEVICE, OUT, FRACTIONS, POINTS (label:pattern:merge), BACKENDS
# (defaults: the H100 run). CPU smoke test (the tiny shape has 2 layers: no adjacent pair fits between
# its first and last, so only the merged pair):
#   SHAPE=tiny CONTEXT=64 BATCH=1 STEPS=4 WARMUP=3 DEVICE=cpu FRACTIONS=0.5 POINTS=minicache:upper:minicache BACKENDS=eager,slimfx \
#     OUT=/tmp/ks_bench benchmarks/gpu_kv_share.sh
set -euo pipefail
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/slimfx && export PYTHONPATH=/tmp/p PYTHONUNBUFFERED=1
SHAPE=${SHAPE:-llama-3.2-1b} CONTEXT=${CONTEXT:-16384} BATCH=${BATCH:-1} STEPS=${STEPS:-64} WARMUP=${WARMUP:-8}
DEVICE=${DEVICE:-cuda} OUT=${OUT:-results/bench_kv_share} FRACTIONS=${FRACTIONS:-0.1 0.2 0.3}
POINTS=${POINTS:-adjacent:adjacent:none minicache:upper:minicache} BACKENDS=${BACKENDS:-eager,inductor,slimfx}
mkdir -p "$OUT"
CFG=$(mktemp -d)
common="--shape $SHAPE --context $CONTEXT --batch $BATCH --steps $STEPS --warmup $WARMUP --device $DEVICE"

write_config() {  # label pattern merge fraction
  cat > "$CFG/$1.toml" <<EOF
[compile]
pipeline = "share"
[pipelines]
share = ["fold_noop_casts", "kv_share"]
[passes.kv_share]
pattern = "$2"
merge = "$3"
fraction = $4
EOF
}

python3 -m slimfx bench $common --backends $BACKENDS --output "$OUT/none" 2>&1 | grep -E "^\| |rror"
for f in $FRACTIONS; do
  for point in $POINTS; do
    IFS=: read -r -a parts <<< "$point"
    set -- "${parts[@]}"
    label="$1_$f"
    write_config "$label" "$2" "$3" "$f"
    python3 -m slimfx bench $common --backends slimfx --config "$CFG/$label.toml" --output "$OUT/$label" 2>&1 | grep -E "^\| slimfx|rror"
  done
done

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows, ref, plain = [], {}, {}
for path in sorted(out.glob("*.json")):
    data = json.loads(path.read_text())
    for res in data["models"][0]["results"]:
        label = res["backend"] if path.stem == "none" and res["backend"] != "slimfx" else f"slimfx {path.stem}"
        for run in res["runs"]:
            rows.append((label, run["batch"], run["kv_bytes"], run["decode_ms_per_token"]))
            if res["backend"] == "inductor":
                ref[run["batch"]] = run
            if label == "slimfx none":
                plain[run["batch"]] = run
rel = lambda x, base, key: f"{x / base[key]:.3f}" if base and base[key] else "-"  # noqa: E731
print("| configuration | batch | KV MiB | KV vs inductor | KV vs slimfx none | decode ms/token | vs inductor | vs slimfx none |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label, batch, kv, ms in rows:
    i, p = ref.get(batch), plain.get(batch)
    print(f"| {label} | {batch} | {kv / 2**20:.2f} | {rel(kv, i, 'kv_bytes')} | {rel(kv, p, 'kv_bytes')} | {ms:.3f} | "
          f"{rel(ms, i, 'decode_ms_per_token')} | {rel(ms, p, 'decode_ms_per_token')} |")
EOF
rm -rf "$CFG"
