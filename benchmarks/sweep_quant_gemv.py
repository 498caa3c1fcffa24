"""Launch-config sweep of the M=1 quantized GEMV kernels (CUDA graph replay medians).

Run once (results/quant_gemv_sweep_h100.json): no launch config moved int4 g128 at
28672x4096 below ~51 us, so the int4 miss is the kernel's inner loop, not its tiling.

    python benchmarks/sweep_quant_gemv.py --out results/quant_gemv_sweep.json
"""
import argparse, json, sys, datetime as dt
import torch
from triton.testing import do_bench
from slimfx.codegen.kernels.gemv_int4 import gemv_int4
from slimfx.codegen.kernels.gemv_int8 import gemv_int8
from slimfx.runtime import quant_formats as qf


def graph_us(copies):
    fn_all = lambda: [f() for f in copies]
    fn_all()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn_all()
    return do_bench(g.replay, warmup=5, rep=25, return_mode="median") * 1e3 / len(copies)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--out", default="results/quant_gemv_sweep.json"); a = ap.parse_args()
    rows = []
    for n, k in [(28672, 4096), (4096, 4096)]:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        c = max(1, -(-150 * 2**20 // (n * k // 2)))
        q4 = [qf.quantize_int4((torch.randn(n, k, device="cuda") * 0.02), 128, hqq=False).tensors for _ in range(c)]
        for bn, bg, w in [(16, 4, 4), (32, 4, 4), (32, 4, 8), (64, 2, 8), (16, 8, 8), (32, 2, 4), (8, 8, 4)]:
            us = graph_us([lambda t=t: gemv_int4(x, t["qweight"], t["scale"], t["offset"], 128, block_n=bn, block_g=bg, num_warps=w) for t in q4])
            rows.append({"kernel": "int4_g128", "N": n, "K": k, "BLOCK_N": bn, "BLOCK_G": bg, "warps": w, "graph_us": us}); print(rows[-1], flush=True)
        del q4
        c8 = max(1, -(-150 * 2**20 // (n * k)))
        q8 = [qf.quantize_int8(torch.randn(n, k, device="cuda")).tensors for _ in range(c8)]
        for bn, bk, w in [(16, 512, 4), (32, 256, 4), (32, 512, 8), (8, 1024, 4), (64, 256, 8)]:
            us = graph_us([lambda t=t: gemv_int8(x, t["qweight"], t["scale"], block_n=bn, block_k=bk, num_warps=w) for t in q8])
            rows.append({"kernel": "int8", "N": n, "K": k, "BLOCK_N": bn, "BLOCK_K": bk, "warps": w, "graph_us": us}); print(rows[-1], flush=True)
        del q8
    out = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__, "rows": rows}
    open(a.out, "w").write(json.dumps(out, indent=1))

if __name__ == "__main__":
    sys.exit(main())
