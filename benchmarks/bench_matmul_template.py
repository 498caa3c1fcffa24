"""Benchmark + on-device check of slimfx's matmul templates (issue 5): template vs cuBLAS.

    python benchmarks/bench_matmul_template.py [--shapes 576x576 1536x576 2048x8192 8192x2048 4096x4096]
        [--m 1] [--dtype bf16] [--epilogues none residual silu_mul] [--budget-s 400]
        [--output results/bench_matmul_template.json] [--space tuner|wide]

Shapes are N x K (out_features x in_features of F.linear's weight W [N, K]). For each
shape, M (decode batch) and epilogue, in the same run, on one GPU:
  * the graph `epilogue(F.linear(x, W))` through slimfx.codegen.compile_graph: its
    output vs eager (max abs error; fails the row if outside the bf16 tolerance);
  * GPU time per call, each measured as a CUDA graph of 20 back-to-back calls (so
    launch overhead is what a decode step sees, not Python's):
      eager      F.linear (cuBLAS) + eager epilogue ops
      library    torch.mm (cuBLAS) + slimfx's epilogue kernel (the autotuner's library choice)
      template   every template config of autotune.gemm_space; the best one is reported
      autotuned  what the autotuner picked, and whether that was the template
  * % of copy bandwidth: (weight + activation + output bytes) / time / measured D2D copy.
Writes one JSON file (device, date, versions, every number) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimfx.measure.report import stamp
from slimfx.measure.timing import copy_bandwidth, time_ms

DEFAULT_SHAPES = ["576x576", "1536x576", "2048x8192", "8192x2048", "4096x4096"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float32: 1e-4}
EPILOGUES = {
    "none": lambda y, r, u: y,
    "residual": lambda y, r, u: y + r,
    "silu_mul": lambda y, r, u: F.silu(y) * u,  # SwiGLU: the up projection u computed elsewhere
}
CALLS_PER_GRAPH = 20
START = time.perf_counter()


def program(epilogue: str):
    def fn(x, w, r, u):
        return EPILOGUES[epilogue](F.linear(x, w), r, u)

    return fn


def graph_time_us(call) -> float:
    """Median GPU microseconds per `call()`, from a CUDA graph of CALLS_PER_GRAPH calls."""
    return 1e3 * time_ms(call, graph=True, calls=CALLS_PER_GRAPH, repeats=20)


def wide_gemv_space(m: int, n: int, k: int) -> list[dict]:
    """--space wide: the library call and a broad GEMV grid (no split-K), to find the tiles
    autotune._GEMV_TILES should hold: BLOCK_N x BLOCK_K x warps x pipelining stages."""
    from slimfx.codegen.autotune import GEMM_LIBRARY, _gemv

    out = [{"impl": GEMM_LIBRARY, "num_warps": 1, "num_stages": 1}]
    for bn in (2, 4, 8, 16):
        for bk in (256, 512, 1024, 2048):
            if bk > k:
                continue
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    out.append({**_gemv(bn, bk, 1, warps), "num_stages": stages})
    return out


def bench_case(n: int, k: int, m: int, dtype, epilogue: str, copy_gbs: float, space: str = "tuner") -> dict:
    from slimfx.codegen import compile_graph
    from slimfx.codegen.autotune import GEMM_LIBRARY, TUNER, gemm_space

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    r = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    u = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    fn = program(epilogue)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w, r, u], cudagraphs=False)
    result = compiled.slimfx_codegen
    row: dict = {"N": n, "K": k, "M": m, "dtype": str(dtype).replace("torch.", ""), "epilogue": epilogue,
                 "groups": [g.describe() for g in result.partition.groups]}
    got = compiled(x, w, r, u)
    got = got[0] if isinstance(got, (tuple, list)) else got
    expected = fn(x, w, r, u)
    row["max_abs_err"] = (got.float() - expected.float()).abs().max().item()
    row["correct"] = bool(torch.allclose(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype]))
    matmuls = [g for g in result.groups if g.group.kind == "matmul"]
    if len(matmuls) != 1 or matmuls[0].source is None:
        row["error"] = f"expected one generated matmul group, got {[g.group.describe() for g in result.groups]}"
        return row
    group = matmuls[0]
    host = group._kernel_fn()
    inputs = result.group_inputs(group.group, [x, w, r, u])
    moved = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor)) + got.numel() * got.element_size()
    row["bytes_moved"] = moved

    def pct(us):
        return round(100 * moved / (us * 1e-6) / 1e9 / copy_gbs, 1)

    row["eager_us"] = round(graph_time_us(lambda: fn(x, w, r, u)), 2)
    timings = []
    for config in (gemm_space(m, n, k) if space == "tuner" else wide_gemv_space(m, n, k)):
        try:
            us = graph_time_us(lambda: host(*inputs, config=config))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile here (resources) is reported
            timings.append({"config": config, "failed": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]})
            continue
        timings.append({"config": config, "us": round(us, 2)})
    ok = [t for t in timings if "us" in t]
    library = [t for t in ok if t["config"]["impl"] == GEMM_LIBRARY]
    templates = [t for t in ok if t["config"]["impl"] != GEMM_LIBRARY]
    row["library_us"] = library[0]["us"] if library else None
    if templates:
        best = min(templates, key=lambda t: t["us"])
        row["template_us"], row["template_config"] = best["us"], best["config"]
        row["template_pct_of_copy_bw"] = pct(best["us"])
        if row["library_us"]:
            row["template_speedup_vs_library"] = round(row["library_us"] / best["us"], 3)
        row["template_speedup_vs_eager"] = round(row["eager_us"] / best["us"], 3)
    host(*inputs)  # the autotuner's own pick (timed and cached on the first call)
    chosen = TUNER.choose(_kernel_hash(host), "gemm", (m, n, k), _dtype_key(host), x.device, None)
    row["autotuned_config"] = chosen
    row["autotuned_us"] = round(graph_time_us(lambda: host(*inputs)), 2)
    row["autotuned_is_template"] = chosen.get("impl") != GEMM_LIBRARY
    row["eager_pct_of_copy_bw"] = pct(row["eager_us"])
    row["all_configs"] = timings
    return row


def _kernel_hash(host) -> str:
    return host.__globals__["KERNEL_HASH"]


def _dtype_key(host) -> str:
    return host.__globals__["KERNELS"].dtype_key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N x K of the weight, e.g. 4096x4096")
    ap.add_argument("--m", nargs="+", type=int, default=[1])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--epilogues", nargs="+", default=sorted(EPILOGUES), choices=sorted(EPILOGUES))
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--output", default="results/bench_matmul_template.json")
    ap.add_argument("--space", default="tuner", choices=["tuner", "wide"],
                    help="configs timed: the autotuner's space, or a wide GEMV grid (wide_gemv_space)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_matmul_template: needs a CUDA GPU", file=sys.stderr)
        return 2
    report = {
        **stamp("cuda"),
        "args": vars(args),
        "timing": f"median of 20 replays of a CUDA graph of {CALLS_PER_GRAPH} calls, per call",
        "copy_bandwidth_gbs": round(copy_bandwidth(), 1),
        "rows": [],
    }
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    print(f"{'N x K':>11} {'M':>3} {'epilogue':>9} {'eager us':>9} {'cuBLAS+epi':>10} {'template':>9} {'%bw':>5} {'vs lib':>6} {'tuned':>8} err")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        for m in args.m:
            for epilogue in args.epilogues:
                if time.perf_counter() - START > args.budget_s:
                    report["rows"].append({"N": n, "K": k, "M": m, "epilogue": epilogue, "skipped": "time budget"})
                    continue
                try:
                    row = bench_case(n, k, m, dtype, epilogue, report["copy_bandwidth_gbs"], args.space)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
                    row = {"N": n, "K": k, "M": m, "epilogue": epilogue, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                report["rows"].append(row)
                out_path.write_text(json.dumps(report, indent=1))
                _print_row(row)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")
    return 0


def _print_row(row: dict) -> None:
    if "error" in row or "skipped" in row:
        print(f"{row['N']:>5}x{row['K']:<5} {row['M']:>3} {row['epilogue']:>9}  {row.get('error') or row.get('skipped')}")
        return
    tuned = "tmpl" if row.get("autotuned_is_template") else "lib"
    print(f"{row['N']:>5}x{row['K']:<5} {row['M']:>3} {row['epilogue']:>9} {row['eager_us']:>9.2f} {row['library_us'] or float('nan'):>10.2f} "
          f"{row.get('template_us', float('nan')):>9.2f} {row.get('template_pct_of_copy_bw', float('nan')):>5} "
          f"{row.get('template_speedup_vs_library', float('nan')):>6} {tuned:>4} {row['autotuned_us']:>6.1f} "
          f"{row['max_abs_err']:.3g}{'' if row['correct'] else ' WRONG'}")


if __name__ == "__main__":
    sys.exit(main())
