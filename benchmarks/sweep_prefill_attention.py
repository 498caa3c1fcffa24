"""Tile sweep of the prefill attention kernel on the runtime's chunked layout (CUDA).

One chunk of --chunk queries at position p0 attends to a store of --capacity slots whose
first p0 are filled, plus the chunk's own keys (`extra`, as the runtime passes them).
Llama-3.2-1B heads by default (32 query heads, 8 KV heads, head_dim 64), bf16. Prints
the time of each (BLOCK_M, BLOCK_N, warps, stages) and checks it against the reference.

    python benchmarks/sweep_prefill_attention.py [--p0 4096 7680] [--capacity 8192]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from slimfx.codegen.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from slimfx.measure.timing import time_ms

CONFIGS = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p0", type=int, nargs="+", default=[4096, 7680])
    ap.add_argument("--capacity", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 64], metavar=("HQ", "HKV", "D"))
    args = ap.parse_args()
    hq, hkv, d = args.heads
    g = torch.Generator(device="cuda").manual_seed(0)
    for p0 in args.p0:
        T, C = args.chunk, args.capacity
        q = torch.randn(1, hq, T, d, device="cuda", generator=g, dtype=torch.bfloat16)
        kc = torch.randn(1, hkv, C, d, device="cuda", generator=g, dtype=torch.bfloat16)
        vc = torch.randn(1, hkv, C, d, device="cuda", generator=g, dtype=torch.bfloat16)
        slots = torch.full((1, hkv, C), -1, device="cuda", dtype=torch.long)
        slots[..., :p0] = torch.arange(p0, device="cuda")
        k2 = torch.randn(1, hkv, T, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v2 = torch.randn(1, hkv, T, d, device="cuda", generator=g, dtype=torch.bfloat16)
        pos = torch.arange(p0, p0 + T, device="cuda")[None]
        ref = prefill_attention_ref(q, pos, kc, vc, slots, extra=(k2, v2, pos)).float()
        flops = 4 * hq * T * (p0 + T / 2) * d
        rows = []
        for bm, bn, w, st in CONFIGS:
            def call():
                return prefill_attention(q, pos, kc, vc, slots, extra=(k2, v2, pos), block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            try:
                err = (call().float() - ref).abs().max().item()
                ms = time_ms(call, warmup=1, calls=20, repeats=1)
            except Exception as exc:  # noqa: BLE001 - a config out of resources is reported, not fatal
                print(f"p0={p0} BM={bm} BN={bn} w={w} s={st}: failed {type(exc).__name__}")
                continue
            rows.append((ms, bm, bn, w, st, err))
        rows.sort()
        print(f"p0={p0} chunk={T} capacity={C} heads={hq}/{hkv}/{d}")
        for ms, bm, bn, w, st, err in rows[:8]:
            print(f"  {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s  BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={st}  max err {err:.3g}")
        default = [r for r in rows if r[1:5] == (64, 64, 4, 2)]
        if default:
            print(f"  default (64, 64, 4, 2): {default[0][0] * 1e3:.1f} us")


if __name__ == "__main__":
    main()
