"""Decode attention over an int8 (and fp8) KV store vs the bf16 store, on the GPU.

    python benchmarks/bench_kv_quant.py --output results/bench_h100_kv_quant.json

Shape: Llama-3.2-1B-like (32 q heads, 8 kv heads, head_dim 64), batch 1, contexts 4K,
16K and 64K. Measured in the same run:

- sdpa:      torch scaled_dot_product_attention over the bf16 cache (enable_gqa), one query
- bf16:      the split-KV decode kernel over the bf16 slot store (codegen/kernels/decode_attention.py)
- int8/fp8:  the two-tier kernel over the quantized store (codegen/kernels/decode_attention_kvq.py):
             the quantized tier of `ctx` slots + the full-precision tier (4 sinks + 128 recent)
- op_*:      a whole decode step of the attention op (quantize-on-write + attention):
             slimfx::attention, plain bf16 layout vs int8 kvq layout, Python launch included

Timings ("graph_us") are CUDA-graph replays cycling over enough store copies that they do
not fit in L2 together, so the KV bytes come from HBM and no Python launch cost is counted
(what a captured decode step pays); "eager_us" are medians of Python calls over the same
copies (launch overhead included); both from slimfx.measure.timing. Correctness of the compiled kernels against the
references is checked first (max abs error recorded). Writes JSON with device, date,
versions and every number measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
from pathlib import Path

import torch
import triton

from slimfx.codegen.kernels.decode_attention import decode_attention, decode_attention_ref
from slimfx.codegen.kernels.decode_attention_kvq import decode_attention_kvq, decode_attention_kvq_ref
from slimfx.measure.timing import time_ms
from slimfx.runtime import kv_quant as kq

HQ, HKV, D = 32, 8, 64
N_SINK, RESIDUAL = 4, 128
CONTEXTS = (4096, 16384, 65536)


def make_store(ctx: int, fmt_name: str | None, gen: torch.Generator):
    """A full store of `ctx` tokens (positions 0..ctx-1), bf16 or quantized + full-precision tier."""
    dev = "cuda"
    k = torch.randn(1, HKV, ctx, D, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, HKV, ctx, D, device=dev, generator=gen).to(torch.bfloat16)
    slot_pos = torch.arange(ctx, device=dev, dtype=torch.int32).expand(1, HKV, ctx).contiguous()
    if fmt_name is None:
        return {"k": k, "v": v, "slot_pos": slot_pos}
    fmt = kq.get_format(fmt_name)
    k_q, k_s, _ = kq.quantize_tokens(k, fmt)
    v_q, v_s, _ = kq.quantize_tokens(v, fmt)
    F = N_SINK + RESIDUAL
    fp_pos = torch.cat([torch.arange(N_SINK), torch.arange(ctx - RESIDUAL, ctx)]).to(dev, torch.int32).expand(1, HKV, F).contiguous()
    fp_k = k.gather(2, fp_pos.long()[..., None].expand(1, HKV, F, D)).contiguous()
    fp_v = v.gather(2, fp_pos.long()[..., None].expand(1, HKV, F, D)).contiguous()
    return {"k_q": k_q, "v_q": v_q, "k_s": k_s, "v_s": v_s, "slot_pos": slot_pos, "fp_k": fp_k, "fp_v": fp_v, "fp_pos": fp_pos}


def kvq_args(q, s, ctx):
    q_pos = torch.full((1,), ctx - 1, device="cuda", dtype=torch.int64)
    limit = q_pos + 1 - RESIDUAL
    return (q, s["k_q"], s["v_q"], s["k_s"], s["v_s"], s["slot_pos"], s["fp_k"], s["fp_v"], s["fp_pos"], q_pos, limit)


def check(gen) -> list[dict]:
    rows = []
    for ctx in (1000, 4099):
        q = torch.randn(1, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        for fmt in ("int8", "fp8"):
            if fmt == "fp8" and not kq.has_fp8():
                continue
            s = make_store(ctx, fmt, gen)
            args = kvq_args(q, s, ctx)
            err = (decode_attention_kvq(*args, n_sink=N_SINK).float() - decode_attention_kvq_ref(*args, n_sink=N_SINK).float()).abs().max().item()
            rows.append({"check": f"kernel_{fmt}_vs_ref", "ctx": ctx, "max_abs_err": err})
    rows += check_op(gen)
    return rows


def check_op(gen) -> list[dict]:
    """The op's CUDA path (Triton write-free decode + kernels) vs its reference path, through
    a prefill chunk and decode steps, for every format."""
    import os

    from slimfx.passes.kv_quantize.op import kvq_site
    from slimfx.runtime.kv_store import KVStore

    rows = []
    T, steps = 300, 8
    q = torch.randn(1, HQ, T + steps, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, HKV, T + steps, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, HKV, T + steps, D, device="cuda", generator=gen).to(torch.bfloat16)
    pos = torch.arange(T + steps, device="cuda")[None]
    for fmt in ("int8", "fp8", "int4", "int2"):
        if fmt == "fp8" and not kq.has_fp8():
            continue
        outs = []
        for mode in ("ref", "triton"):
            os.environ["SLIMFX_ATTENTION"] = mode
            store = KVStore(1, 512, dtype=torch.bfloat16, device="cuda")
            cache = kvq_site(store.site(0, HKV, D), fmt, 32, 64, 4)
            bufs, meta = cache.buffers(), (1 / math.sqrt(D), cache.layout)
            torch.ops.slimfx.attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], pos[:, :T], bufs, *meta)
            outs.append(torch.cat([torch.ops.slimfx.attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1].contiguous(), bufs, *meta)
                                   for t in range(T, T + steps)], dim=2))
        os.environ.pop("SLIMFX_ATTENTION")
        rows.append({"check": f"op_{fmt}_triton_vs_ref_decode", "ctx": T + steps, "max_abs_err": (outs[0].float() - outs[1].float()).abs().max().item()})
    return rows


def _l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)


def copies_for(nbytes: int) -> int:
    """Store copies cycled through per timed call so that they do not fit in L2 together."""
    return max(2, min(16, -(-3 * _l2_bytes() // max(1, nbytes))))


def graph_us(fns, reps: int = 10) -> float:
    """Microseconds per call: `fns` (one per store copy) captured `reps` times in one CUDA
    graph and replayed. No Python launch cost, KV read from HBM."""
    return 1e3 * time_ms(lambda: [fn() for fn in fns], graph=True, calls=reps, repeats=5) / len(fns)


def eager_us(fns) -> float:
    """Microseconds per Python call, cycling over the store copies (KV read from HBM,
    launch cost included)."""
    return 1e3 * time_ms(lambda: [fn() for fn in fns], repeats=20) / len(fns)


def bench(gen) -> list[dict]:
    rows = []
    for ctx in CONTEXTS:
        q = torch.randn(1, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        q_pos = torch.full((1,), ctx - 1, device="cuda", dtype=torch.int64)
        kv_bytes = {"sdpa": 2 * HKV * ctx * D * 2, "bf16": 2 * HKV * ctx * D * 2}
        graph, eager = {}, {}
        fulls = [make_store(ctx, None, gen) for _ in range(copies_for(kv_bytes["bf16"]))]
        q4 = q[:, :, None, :]
        sdpa = [lambda f=f: torch.nn.functional.scaled_dot_product_attention(q4, f["k"], f["v"], enable_gqa=True) for f in fulls]
        bf16 = [lambda f=f: decode_attention(q, f["k"], f["v"], f["slot_pos"], q_pos) for f in fulls]
        graph["sdpa"], eager["sdpa"] = graph_us(sdpa), eager_us(sdpa)
        graph["bf16"], eager["bf16"] = graph_us(bf16), eager_us(bf16)
        del fulls, sdpa, bf16
        for fmt in ("int8", "fp8"):
            if fmt == "fp8" and not kq.has_fp8():
                continue
            kv_bytes[fmt] = 2 * HKV * ctx * (D + 4) + 2 * HKV * (N_SINK + RESIDUAL) * D * 2
            stores = [make_store(ctx, fmt, gen) for _ in range(copies_for(kv_bytes[fmt]))]
            fns = [lambda a=kvq_args(q, s, ctx): decode_attention_kvq(*a, n_sink=N_SINK) for s in stores]
            graph[fmt], eager[fmt] = graph_us(fns), eager_us(fns)
            del stores, fns
        graph.update(bench_op_step(ctx, gen))
        row = {"ctx": ctx, "batch": 1, "q_heads": HQ, "kv_heads": HKV, "head_dim": D,
               "graph_us": graph, "eager_us": eager, "kv_bytes": kv_bytes,
               "speedup_int8_vs_bf16": graph["bf16"] / graph["int8"],
               "speedup_op_int8_vs_op_bf16": graph["op_bf16"] / graph["op_int8"],
               "hbm_gbps": {k: kv_bytes[k] / (graph[k] * 1e-6) / 1e9 for k in kv_bytes}}
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def bench_op_step(ctx: int, gen) -> dict:
    """One decode step of the whole op (write + attention) in a CUDA graph: bf16
    slimfx::attention, plain layout vs int8 kvq layout (also shows the step is capturable)."""
    from slimfx.passes.kv_quantize.op import kvq_site
    from slimfx.runtime.kv_store import KVStore

    q = torch.randn(1, HQ, 1, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, HKV, 1, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn_like(k)
    pos = torch.full((1, 1), ctx - 1, device="cuda", dtype=torch.int64)
    n = copies_for(2 * HKV * ctx * D * 2)
    sites, caches = [], []
    for i in range(n):
        store = KVStore(1, ctx, dtype=torch.bfloat16, device="cuda")
        site = store.site(0, HKV, D)
        site.slot_pos.copy_(torch.arange(ctx, device="cuda", dtype=torch.int32).expand_as(site.slot_pos))
        sites.append(site)
        cache = kvq_site(site, "int8", 1, RESIDUAL, N_SINK)
        cache.slot_pos.copy_(site.slot_pos)
        cache.main.k_scale.fill_(0.01)
        cache.main.v_scale.fill_(0.01)
        caches.append(cache)
    out = {"op_bf16": graph_us([lambda s=s: torch.ops.slimfx.attention(q, k, v, pos, s.buffers(), 0.125, s.layout) for s in sites], reps=4)}
    del sites
    out["op_int8"] = graph_us([lambda c=c: torch.ops.slimfx.attention(q, k, v, pos, c.buffers(), 0.125, c.layout) for c in caches], reps=4)
    return out


def sweep(gen) -> list[dict]:
    """Launch configurations of the int8 kernel (graph timing), to pick the defaults."""
    rows = []
    for ctx in (16384, 65536):
        q = torch.randn(1, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        stores = [make_store(ctx, "int8", gen) for _ in range(copies_for(2 * HKV * ctx * (D + 4)))]
        for block_n in (64, 128, 256):
            for splits in (32, 64):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        fns = [lambda a=kvq_args(q, s, ctx): decode_attention_kvq(*a, n_sink=N_SINK, splits=splits, block_n=block_n, num_warps=warps, num_stages=stages) for s in stores]
                        rows.append({"ctx": ctx, "block_n": block_n, "splits": splits, "num_warps": warps, "num_stages": stages, "us": graph_us(fns, reps=5)})
        del stores
        best = min((r for r in rows if r["ctx"] == ctx), key=lambda r: r["us"])
        print(f"sweep ctx {ctx}: best {best}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations of the int8 kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kv_quant: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks = check(gen)
    sweep_rows = sweep(gen) if args.sweep else []
    rows = bench(gen)
    print(f"{'ctx':>6} " + " ".join(f"{k:>9}" for k in rows[0]["graph_us"]) + "   int8/bf16 kernel, op   (us per call, CUDA-graph replay)")
    for r in rows:
        print(f"{r['ctx']:>6} " + " ".join(f"{t:9.2f}" for t in r["graph_us"].values())
              + f"   {r['speedup_int8_vs_bf16']:.2f}x {r['speedup_op_int8_vs_op_bf16']:.2f}x   eager: " + " ".join(f"{k} {t:.1f}" for k, t in r["eager_us"].items()))
    for c in checks:
        print(f"check {c['check']} ctx {c['ctx']}: max abs err {c['max_abs_err']:.2e}")
    result = {
        "benchmark": "bench_kv_quant", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "n_sink": N_SINK, "residual": RESIDUAL, "checks": checks, "rows": rows, "sweep": sweep_rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
