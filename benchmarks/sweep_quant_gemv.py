"""Launch-config sweep of the M=1 quantized GEMV kernels (CUDA graph replay medians, weights
rotated through >= 150 MB of copies so every call streams from HBM, not L2), with the bf16
baseline (F.linear = cuBLAS) timed the same way in the same run.

The first sweep (results/quant_gemv_sweep_h100.json, 2026-11-22) moved only BLOCK_N, the
K tile and warps; this one adds num_stages and forced split-K, which decide how many bytes
each SM keeps in flight.

    python benchmarks/sweep_quant_gemv.py --out results/quant_gemv_sweep.json
"""
import argparse
import datetime as dt
import itertools
import json
import sys

import torch

from slimfx.codegen.kernels.gemv_int4 import gemv_int4
from slimfx.codegen.kernels.gemv_int8 import gemv_int8
from slimfx.measure.timing import time_ms
from slimfx.passes.quantize import formats as qf

SHAPES = [(28672, 4096), (4096, 4096), (8192, 2048), (2048, 2048)]
COPY_BYTES = 150 * 2**20


def graph_us(copies) -> float:
    """Median us per call of `copies` replayed back to back from one CUDA graph."""
    return 1e3 * time_ms(lambda: [f() for f in copies], graph=True, warmup=1, repeats=25) / len(copies)


def n_copies(nbytes: int) -> int:
    return max(1, -(-COPY_BYTES // nbytes))


def sweep_shape(n: int, k: int, rows: list) -> None:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_copies(2 * n * k))]
    rows.append({"kernel": "bf16 F.linear", "N": n, "K": k, "graph_us": graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])})
    print(rows[-1], flush=True)
    q8 = [qf.quantize_int8(w.float()).tensors for w in ws[: n_copies(n * k)]]
    q4 = [qf.quantize_int4(w.float(), 128, hqq=False).tensors for w in ws[: n_copies(n * k // 2)]]
    del ws
    for bn, bk, warps, stages, split in itertools.product((4, 8, 16), (1024, 2048), (4, 8), (1, 3), (None, 1)):
        try:
            us = graph_us([lambda t=t: gemv_int8(x, t["qweight"], t["scale"], block_n=bn, block_k=bk, num_warps=warps,
                                                 num_stages=stages, split_k=split) for t in q8])
        except Exception as exc:  # a config the compiler refuses (registers, shared memory)
            print("int8 skip", bn, bk, warps, stages, type(exc).__name__, flush=True)
            continue
        rows.append({"kernel": "int8", "N": n, "K": k, "BLOCK_N": bn, "BLOCK_K": bk, "warps": warps, "stages": stages,
                     "split_k": split or "heuristic", "graph_us": us})
    for bn, bg, warps, stages, split in itertools.product((8, 16), (4, 8, 16), (4, 8), (1, 3), (None, 1)):
        try:
            us = graph_us([lambda t=t: gemv_int4(x, t["qweight"], t["scale"], t["offset"], 128, block_n=bn, block_g=bg,
                                                 num_warps=warps, num_stages=stages, split_k=split) for t in q4])
        except Exception as exc:
            print("int4 skip", bn, bg, warps, stages, type(exc).__name__, flush=True)
            continue
        rows.append({"kernel": "int4_g128", "N": n, "K": k, "BLOCK_N": bn, "BLOCK_G": bg, "warps": warps, "stages": stages,
                     "split_k": split or "heuristic", "graph_us": us})
    for kern in ("int8", "int4_g128"):
        mine = [r for r in rows if r["kernel"] == kern and r["N"] == n and r["K"] == k]
        best = min(mine, key=lambda r: r["graph_us"])
        print(f"{kern} {n}x{k}: best of {len(mine)}: {best}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/quant_gemv_sweep.json")
    a = ap.parse_args()
    rows: list = []
    for n, k in SHAPES:
        sweep_shape(n, k, rows)
        torch.cuda.empty_cache()
        # Written after every shape, so a run cut short keeps what it measured.
        out = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "method": __doc__.strip(), "rows": rows}
        open(a.out, "w").write(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
