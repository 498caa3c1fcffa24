"""Benchmark of the KV runtime (issue 4): decode speed end to end and the decode attention kernel.

    python benchmarks/bench_runtime.py [--kernels] [--decode] [--out results/bench_runtime.json]

On one GPU, in the same run:
  * copy bandwidth (device-to-device copy; bytes read + written / time),
  * decode at batch 1, bf16, random weights, for the SmolLM2-135M and Llama-3.2-1B shapes at
    1K and 16K context: HF eager (DynamicCache), HF + inductor reduce-overhead (StaticCache),
    slimfx generate (only the lossless runtime pass); ms/token, achieved GB/s (weights + KV
    bytes read per step / time) and the fraction of the copy bandwidth,
  * the decode attention kernel alone vs scaled_dot_product_attention at 4K-64K context.
Writes one JSON file (device, date, versions, every number) and prints tables.
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
from slimfx.measure.shapes import SHAPES, build
from slimfx.measure.timing import copy_bandwidth, loop_ms, time_ms

DEFAULT_SHAPES = "smollm2-135m,llama-3.2-1b"
KERNEL_HEADS = [(32, 8, 64), (9, 3, 64), (32, 8, 128)]
KERNEL_CONTEXTS = [4096, 16384, 65536]
TIMED_TOKENS = 64


# ----------------------------------------------------------------------------- kernel


def kernel_rows(copy_gbs: float) -> list[dict]:
    """Kernel vs SDPA, replayed from CUDA graphs. The KV is rotated over enough copies to
    exceed 200 MB per replay: the H100's 50 MB L2 would otherwise hold a 16K context
    (33 MB) and the numbers would measure the cache, not HBM (METHOD.md)."""
    from slimfx.codegen.kernels.decode_attention import decode_attention

    rows = []
    for hq, hkv, d in KERNEL_HEADS:
        for ctx in KERNEL_CONTEXTS:
            kv_bytes = 2 * hkv * ctx * d * 2
            n_sets = max(1, min(16, -(-200_000_000 // kv_bytes)))
            q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
            ks = [torch.randn(1, hkv, ctx, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
            vs = [torch.randn_like(k) for k in ks]
            slot_pos = torch.arange(ctx, device="cuda", dtype=torch.int32).expand(1, hkv, ctx).contiguous()
            q_pos = torch.tensor([ctx], device="cuda")
            scores = torch.zeros(1, hkv, ctx, device="cuda")

            def rotated(call):
                return lambda: [call(k, v) for k, v in zip(ks, vs)]

            sdpa_ms = time_ms(rotated(lambda k, v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)), graph=True) / n_sets
            ours = {}
            for split, bn in ((None, None), (16, 64), (32, 64), (32, 128), (64, 128)):
                try:
                    ours[(split, bn)] = time_ms(rotated(lambda k, v: decode_attention(q, k, v, slot_pos, q_pos, splits=split, block_n=bn)), graph=True) / n_sets
                except Exception as exc:  # a config that does not compile is skipped, and said
                    print(f"  config splits={split} block_n={bn}: {type(exc).__name__}: {exc}", file=sys.stderr)
            default_ms = ours[(None, None)]
            best_cfg = min(ours, key=ours.get)
            track_ms = time_ms(rotated(lambda k, v: decode_attention(q, k, v, slot_pos, q_pos, scores=scores, decay=1.0)), graph=True) / n_sets
            rows.append({
                "heads": f"{hq}/{hkv}x{d}", "context": ctx, "kv_bytes": kv_bytes, "rotated_kv_sets": n_sets,
                "sdpa_us": sdpa_ms * 1e3, "sdpa_frac_copy_bw": kv_bytes / (sdpa_ms * 1e-3) / 1e9 / copy_gbs,
                "slimfx_us": default_ms * 1e3, "slimfx_frac_copy_bw": kv_bytes / (default_ms * 1e-3) / 1e9 / copy_gbs,
                "slimfx_best_us": ours[best_cfg] * 1e3, "slimfx_best_config": {"splits": best_cfg[0], "block_n": best_cfg[1]},
                "slimfx_best_frac_copy_bw": kv_bytes / (ours[best_cfg] * 1e-3) / 1e9 / copy_gbs,
                "slimfx_with_scores_us": track_ms * 1e3,
            })
            frac = kv_bytes / (default_ms * 1e-3) / 1e9 / copy_gbs
            sfrac = kv_bytes / (sdpa_ms * 1e-3) / 1e9 / copy_gbs
            print(f"kernel {hq}/{hkv}x{d} ctx {ctx}: sdpa {sdpa_ms*1e3:.1f} us ({sfrac:.0%}), slimfx {default_ms*1e3:.1f} us ({frac:.0%}; best {ours[best_cfg]*1e3:.1f} {best_cfg}), +scores {track_ms*1e3:.1f} us", flush=True)
    return rows


# ----------------------------------------------------------------------------- decode end to end


def step_bytes(model, context: int) -> tuple[int, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * context * c.head_dim * 2
    return weights, kv


@torch.inference_mode()
def hf_eager(model, ids) -> float:
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    state = {"tok": tok}

    def step():
        o = model(state["tok"], past_key_values=past, use_cache=True)
        state["tok"] = o.logits[:, -1:].argmax(-1)

    for _ in range(3):
        step()
    return loop_ms(step, TIMED_TOKENS)


def hf_inductor_reduce_overhead(model, ids) -> float:
    from transformers import StaticCache

    T = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=T + TIMED_TOKENS + 16)

    def fwd(tok, pos):
        return model(tok, past_key_values=cache, cache_position=pos, position_ids=pos[None], use_cache=True).logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        tok = model(ids, past_key_values=cache, cache_position=torch.arange(T, device="cuda"), use_cache=True).logits[:, -1:].argmax(-1)
    compiled = torch.compile(fwd, mode="reduce-overhead", fullgraph=True)
    state = {"tok": tok, "pos": T}

    def step():
        with torch.inference_mode():
            state["tok"] = compiled(state["tok"], torch.tensor([state["pos"]], device="cuda")).clone()
        state["pos"] += 1

    t = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    return loop_ms(step, TIMED_TOKENS), compile_s


def slimfx_decode(model, ids) -> tuple[float, dict]:
    from slimfx.runtime.generate import generate

    T = ids.shape[1]
    kw = dict(max_new_tokens=TIMED_TOKENS + 3, capacity=T + TIMED_TOKENS + 16, prefill_chunk=2048)
    t = time.perf_counter()
    generate(model, ids, **kw)  # compiles prefill + decode graphs
    first_s = time.perf_counter() - t
    _, stats = generate(model, ids, **kw)
    return stats["ms_per_step"], {**stats, "first_call_s": first_s}


def decode_rows(copy_gbs: float, shapes, contexts, methods) -> list[dict]:
    rows = []
    for shape in shapes:
        model = build(shape, torch.bfloat16, "cuda")
        for ctx in contexts:
            ids = torch.randint(0, model.config.vocab_size, (1, ctx), device="cuda")
            w, kv = step_bytes(model, ctx)
            row = {"shape": shape, "context": ctx, "weight_bytes": w, "kv_bytes": kv, "roofline_ms": (w + kv) / copy_gbs / 1e6}
            for name in methods:
                torch._dynamo.reset()
                try:
                    if name == "hf_eager":
                        ms = hf_eager(model, ids)
                    elif name == "hf_inductor_reduce_overhead":
                        ms, row["hf_inductor_compile_s"] = hf_inductor_reduce_overhead(model, ids)
                    else:
                        ms, stats = slimfx_decode(model, ids)
                        row["slimfx_stats"] = stats
                except Exception as exc:
                    print(f"{shape} {ctx} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                gbs = (w + kv) / (ms * 1e-3) / 1e9
                row[name] = {"ms_per_token": ms, "achieved_gbs": gbs, "frac_copy_bw": gbs / copy_gbs}
                print(f"{shape} ctx {ctx} {name}: {ms:.3f} ms/token, {gbs:.0f} GB/s ({gbs / copy_gbs:.0%} of copy)", flush=True)
            rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", action="store_true", help="time the decode attention kernel vs SDPA")
    ap.add_argument("--decode", action="store_true", help="time end-to-end decode (HF eager, HF inductor, slimfx)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of model shapes ({', '.join(SHAPES)})")
    ap.add_argument("--contexts", default="1024,16384", help="comma list of decode contexts")
    ap.add_argument("--methods", default="hf_eager,hf_inductor_reduce_overhead,slimfx")
    ap.add_argument("--out", default="results/bench_runtime.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_runtime: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    result = {
        **stamp("cuda"),
        "copy_bandwidth_gbs": copy_gbs, "timed_tokens": TIMED_TOKENS,
    }
    if args.kernels:
        result["decode_attention_kernel"] = kernel_rows(copy_gbs)
    if args.decode:
        result["decode"] = decode_rows(copy_gbs, args.shapes.split(","), [int(c) for c in args.contexts.split(",")], args.methods.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
