"""Weight-only quantized GEMV/GEMM on the GPU: correctness (compiled kernels vs references)
and speed against bf16 F.linear (cuBLAS) and torch's tinygemm int4 (`_weight_int4pack_mm`,
what torchao's int4 weight-only uses) in the same run.

    python benchmarks/bench_quant_gemv.py --out results/quant_gemv_h100.json

Timing (slimfx.measure.timing): medians of Python calls ("eager", launch included) and CUDA-graph
replays of the same calls ("graph", what a captured decode step pays). Each timed call
cycles over enough weight copies that they do not fit in L2 (the 4096x4096 int4 weight
is 8 MiB, L2 is 50 MiB), so every call reads its weight from HBM.
Writes JSON with device, date, versions and every number measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimfx.codegen.kernels.gemv_int4 import gemv_int4, gemv_int4_ref
from slimfx.codegen.kernels.gemv_int8 import gemv_int8, gemv_int8_ref
from slimfx.measure.report import stamp
from slimfx.measure.shapes import SHAPES
from slimfx.measure.timing import time_ms
from slimfx.passes.quantize import formats as qf

MAIN_SHAPES = [(28672, 4096), (4096, 4096)]  # (N, K)
DECODE_SUM_SHAPES = ["llama-3.2-1b", "llama-3.1-8b"]


def linear_shapes(shape: str) -> dict:
    """The (N, K) of one decoder layer's linears with their count per layer, and the
    head's, from slimfx.measure.shapes: for a linear-only decode sum."""
    c = SHAPES[shape]
    h, q, kv, i = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    return {"layers": c["num_hidden_layers"], "per_layer": [((q, h), 1), ((h, q), 1), ((kv, h), 2), ((i, h), 2), ((h, i), 1)],
            "head": (c["vocab_size"], h)}


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def check_correctness(device: str) -> list[dict]:
    """Compiled kernels vs references: odd shapes, every group size, M = 1 (GEMV) and M > 1 (GEMM)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 96), (300, 4160), (96, 8192)]
    for (n, k) in shapes:
        w = torch.randn(n, k, generator=gen).to(device)
        b = torch.randn(n, generator=gen).to(device)
        for m in (1, 5, 33):
            for dtype in (torch.bfloat16, torch.float32) if m != 5 else (torch.bfloat16,):
                x = torch.randn(m, k, generator=gen).to(device, dtype)
                q = qf.quantize_int8(w)
                out = gemv_int8(x, q.tensors["qweight"], q.tensors["scale"], b)
                rows.append({"kernel": "int8", "N": n, "K": k, "M": m, "dtype": str(dtype), "rel_err": rel_err(out, gemv_int8_ref(x, q.tensors["qweight"], q.tensors["scale"], b))})
                if device == "cuda" and qf.fp8_supported(device)[0]:
                    q = qf.quantize_fp8(w)
                    out = gemv_int8(x, q.tensors["qweight"], q.tensors["scale"], b)
                    rows.append({"kernel": "fp8", "N": n, "K": k, "M": m, "dtype": str(dtype), "rel_err": rel_err(out, gemv_int8_ref(x, q.tensors["qweight"], q.tensors["scale"], b))})
                for g in qf.GROUP_SIZES:
                    if k % g:
                        continue
                    q = qf.quantize_int4(w, g)
                    t = q.tensors
                    out = gemv_int4(x, t["qweight"], t["scale"], t["offset"], g, b)
                    ref = gemv_int4_ref(x, t["qweight"], t["scale"], t["offset"], g, b)
                    rows.append({"kernel": f"int4_g{g}", "N": n, "K": k, "M": m, "dtype": str(dtype), "rel_err": rel_err(out, ref)})
    return rows


class Variant:
    """One way to compute y = x @ W.T for a shape, with `copies` weights to cycle through."""

    def __init__(self, name, make, copies):
        self.name, self.fns = name, [make() for _ in range(copies)]

    def call_all(self, x):
        for fn in self.fns:
            fn(x)


def _copies(weight_bytes: int, l2_bytes: int) -> int:
    return max(1, min(16, -(-3 * l2_bytes // max(1, weight_bytes))))


def variants_for(n: int, k: int, device: str, l2: int, with_fp8: bool, m: int):
    out = []
    gen = torch.Generator(device=device).manual_seed(n * 7 + k)

    def w_bf16():
        return (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)

    def bf16():
        w = w_bf16()
        return lambda x: F.linear(x, w)

    def int8():
        q = qf.quantize_int8(w_bf16())
        qw, s = q.tensors["qweight"], q.tensors["scale"]
        return lambda x: gemv_int8(x, qw, s)

    def fp8():
        q = qf.quantize_fp8(w_bf16())
        qw, s = q.tensors["qweight"], q.tensors["scale"]
        return lambda x: gemv_int8(x, qw, s)

    def int4(g):
        def make():
            q = qf.quantize_int4(w_bf16(), g, hqq=False)  # speed does not depend on HQQ
            t = q.tensors
            return lambda x: gemv_int4(x, t["qweight"], t["scale"], t["offset"], g)
        return make

    def tinygemm():
        codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32, generator=gen)
        packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed, 8)
        sz = (torch.rand(k // 128, n, 2, device=device, generator=gen) * 0.01).to(torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x, wp, 128, sz)

    out.append(Variant("bf16 F.linear", bf16, _copies(2 * n * k, l2)))
    out.append(Variant("int8 triton", int8, _copies(n * k, l2)))
    if with_fp8:
        out.append(Variant("fp8 triton", fp8, _copies(n * k, l2)))
    out.append(Variant("int4_g128 triton", int4(128), _copies(n * k // 2, l2)))
    out.append(Variant("int4_g64 triton", int4(64), _copies(n * k // 2, l2)))
    try:
        v = Variant("int4_g128 tinygemm (torch._weight_int4pack_mm)", tinygemm, _copies(n * k // 2, l2))
        v.call_all(torch.randn(m, k, device=device, dtype=torch.bfloat16))
        out.append(v)
    except Exception as exc:  # the private op's signature moves between torch versions
        out.append(f"tinygemm unavailable: {type(exc).__name__}: {str(exc)[:160]}")
    return out


def time_variant(v: Variant, x: torch.Tensor) -> dict:
    per = len(v.fns)
    eager_ms = time_ms(lambda: v.call_all(x), warmup=10, repeats=40) / per
    try:
        graph_ms = time_ms(lambda: v.call_all(x), graph=True, warmup=1, repeats=40) / per
    except Exception as exc:
        return {"eager_us": eager_ms * 1e3, "graph_us": None, "graph_error": str(exc)[:160]}
    return {"eager_us": eager_ms * 1e3, "graph_us": graph_ms * 1e3}


def bench_shape(n, k, m, device, l2, with_fp8) -> dict:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    entry = {"N": n, "K": k, "M": m, "variants": {}, "notes": []}
    for v in variants_for(n, k, device, l2, with_fp8, m):
        if isinstance(v, str):
            entry["notes"].append(v)
            continue
        entry["variants"][v.name] = time_variant(v, x)
        del v
    torch.cuda.empty_cache()
    base = entry["variants"]["bf16 F.linear"]
    for name, t in entry["variants"].items():
        for mode in ("eager", "graph"):
            if t.get(f"{mode}_us") and base.get(f"{mode}_us"):
                t[f"speedup_{mode}"] = base[f"{mode}_us"] / t[f"{mode}_us"]
    return entry


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/quant_gemv.json")
    ap.add_argument("--quick", action="store_true", help="main shapes at M=1 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    with_fp8 = qf.fp8_supported(dev)[0]
    try:
        import torchao  # noqa: F401
        torchao_note = f"torchao {torchao.__version__} importable (not benchmarked here)"
    except Exception as exc:
        torchao_note = f"torchao not installed on this machine ({type(exc).__name__}); tinygemm int4 via torch._weight_int4pack_mm is the int4 baseline"
    result = {
        **stamp(dev), "sm_count": props.multi_processor_count, "l2_bytes": l2,
        "torchao": torchao_note,
    }
    t0 = time.time()
    corr = check_correctness(dev)
    worst = {}
    for r in corr:
        key = f"{r['kernel']} {r['dtype']}"
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    result["correctness_worst_rel_err"] = worst
    result["correctness_cases"] = len(corr)
    print(f"correctness: {len(corr)} cases in {time.time() - t0:.1f} s; worst rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), flush=True)
    benches = []
    ms = (1,) if args.quick else (1, 4, 16)
    for (n, k) in MAIN_SHAPES:
        for m in ms:
            benches.append(bench_shape(n, k, m, dev, l2, with_fp8))
            _print_entry(benches[-1])
    result["gemv"] = benches
    if not args.quick:
        result["decode_linear_sum"] = decode_sums(dev, l2, with_fp8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


def decode_sums(dev, l2, with_fp8) -> dict:
    """Sum of separately timed M=1 linears (graph replay) of one decode step: every layer's
    linears plus the head. Attention, norms and launches between ops are not included."""
    cache: dict = {}
    out = {}
    for model in DECODE_SUM_SHAPES:
        spec = linear_shapes(model)
        totals: dict = {}
        shapes = [(s, c * spec["layers"]) for s, c in spec["per_layer"]] + [(spec["head"], 1)]
        for (n, k), count in shapes:
            if (n, k) not in cache:
                cache[(n, k)] = bench_shape(n, k, 1, dev, l2, with_fp8)
                _print_entry(cache[(n, k)])
            for name, t in cache[(n, k)]["variants"].items():
                if t.get("graph_us") is not None:
                    totals[name] = totals.get(name, 0.0) + t["graph_us"] * count
        out[model] = {"linear_us_per_token": totals, "note": "sum of per-shape graph-replay medians, M=1; head included; attention/norms excluded"}
        print(model, {k: round(v) for k, v in totals.items()}, flush=True)
    return out


def _print_entry(e) -> None:
    cells = []
    for name, t in e["variants"].items():
        g = t.get("graph_us")
        cells.append(f"{name.split(' (')[0]}: {t['eager_us']:.1f}/{g:.1f} us" if g else f"{name}: {t['eager_us']:.1f} us")
    print(f"N={e['N']} K={e['K']} M={e['M']} (eager/graph)  " + " | ".join(cells) + ("  " + "; ".join(e["notes"]) if e["notes"] else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
