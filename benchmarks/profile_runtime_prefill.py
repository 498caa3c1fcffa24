"""Where slimfx's runtime prefill spends its GPU time: one `generate` call (prompt of
--context tokens, one new token) profiled with torch.profiler after a compiling call;
prints CUDA time per kernel name (top 30) and the total.

    python benchmarks/profile_runtime_prefill.py --shape llama-3.2-1b --context 4096 --codegen slimfx
"""

from __future__ import annotations

import argparse
import time

import torch

from slimfx.runtime.generate import generate
from slimfx.runtime.measure.shapes import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--codegen", default="slimfx")
    p.add_argument("--config", default=None)
    args = p.parse_args()
    model = build(args.shape, torch.bfloat16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda")
    generate(model, ids, max_new_tokens=1, codegen=args.codegen, config=args.config)  # compiles
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = generate(model, ids, max_new_tokens=1, codegen=args.codegen, config=args.config).stats
    print(f"prefill {1e3 * stats['prefill_s']:.1f} ms (wall of a whole call {1e3 * (time.perf_counter() - t0):.1f} ms)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        generate(model, ids, max_new_tokens=1, codegen=args.codegen, config=args.config)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name[:90], [0.0, 0])
            r[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            r[1] += 1
    total = sum(v[0] for v in rows.values())
    print(f"CUDA kernel time {total / 1e3:.1f} ms over {sum(v[1] for v in rows.values())} kernels")
    for name, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{us / 1e3:9.2f} ms {n:6d}x  {name}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
