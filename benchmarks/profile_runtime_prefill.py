"""Where slimfx's runtime prefill spends its GPU time: one `generate` call (prompt of
--context tokens, one new token) profiled with torch.profiler after a compiling call;
prints CUDA time per kernel name (top 30) and the total.

With --decode-steps N: the decode step instead. Two calls are profiled, with 1 and
1 + N new tokens; the per-kernel difference over N is the time per decode step (the
decode step replays a CUDA graph; CUPTI still reports its kernels).

    python benchmarks/profile_runtime_prefill.py --shape llama-3.2-1b --context 4096 --codegen slimfx
    python benchmarks/profile_runtime_prefill.py --shape llama-3.2-1b --context 1024 --decode-steps 64
"""

from __future__ import annotations

import argparse
import time

import torch

from slimfx.measure.shapes import build
from slimfx.runtime.generate import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--codegen", default="slimfx")
    p.add_argument("--config", default=None)
    p.add_argument("--decode-steps", type=int, default=0)
    args = p.parse_args()
    if args.decode_steps:
        return profile_decode(args)
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


def kernel_times(model, ids, args, new_tokens: int) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, ids, max_new_tokens=new_tokens, codegen=args.codegen, config=args.config)
        torch.cuda.synchronize()
    rows: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name[:90], [0.0, 0])
            r[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            r[1] += 1
    return rows


def profile_decode(args) -> None:
    model = build(args.shape, torch.bfloat16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda")
    n = args.decode_steps
    generate(model, ids, max_new_tokens=1 + n, codegen=args.codegen, config=args.config)  # compiles, captures
    stats = generate(model, ids, max_new_tokens=1 + n, codegen=args.codegen, config=args.config).stats
    print(f"decode {1e3 * stats['decode_s'] / max(1, stats['decode_steps']):.3f} ms/token (generate's own timing, host clock)")
    short, long = kernel_times(model, ids, args, 1), kernel_times(model, ids, args, 1 + n)
    per_step = {k: ((v[0] - short.get(k, [0.0, 0])[0]) / n, (v[1] - short.get(k, [0.0, 0])[1]) / n) for k, v in long.items()}
    total = sum(us for us, _ in per_step.values())
    launches = sum(c for _, c in per_step.values())
    print(f"per decode step: {total / 1e3:.3f} ms of kernel time over {launches:.0f} kernels")
    for name, (us, count) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{us / 1e3:9.4f} ms {count:6.1f}x  {name}")


if __name__ == "__main__":
    main()
