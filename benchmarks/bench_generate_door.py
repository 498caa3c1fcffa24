"""HF `generate` through slimfx (path 1: torch.compile(model, backend="slimfx")) against
slimfx.runtime.generate and HF's own compiled generate, per decoded token, in one run.

    python benchmarks/bench_generate_door.py [--shape llama-3.2-1b] [--contexts 1024,16384]
        [--new-tokens 128] [--reps 3] [--methods ...] [--out results/bench_h100_generate_door_llama1b.json]

Methods (batch 1, random weights, greedy, no EOS so every call decodes --new-tokens):
  hf_compiled_static   HF generate with cache_implementation="static", which compiles the
                       forward itself (fullgraph, mode="reduce-overhead": inductor + CUDA graphs)
  path1_off            torch.compile(model, backend="slimfx").generate(...), passes off
  path1_h2o            the same with kv_eviction H2O at a budget of --budget tokens
  runtime_off          slimfx.runtime.generate(model, ids), passes off
  runtime_h2o          slimfx.runtime.generate with the same H2O configuration
Per-token time is wall time between the first and the last new token divided by the
steps between them: HF's through a streamer (its loop syncs every step anyway); slimfx's
from the call's wall time minus its prefill (stats prefill_s), so whatever path 1 adds
around the runtime (argument handling, output) counts, plus the runtime's own
ms_per_step (timed decode steps after warm-up). Each method is warmed (compiled,
captured) by one call first, then timed --reps times, reps alternating over methods.
Targets checked and written: path1_off within 10% of runtime_off per token, and faster
than hf_compiled_static. Writes JSON (device, date, versions, every number); --device cpu
with --shape tiny is the smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import slimfx.compiler.backend  # noqa: F401 - backend="slimfx" by name where slimfx is not pip-installed
from slimfx.measure.report import stamp, write_json
from slimfx.measure.timing import TokenClock
from slimfx.measure.shapes import SHAPES, build

METHODS = ("hf_compiled_static", "path1_off", "path1_h2o", "runtime_off", "runtime_h2o")


def h2o_config(budget: int) -> dict:
    return {"compile": {"pipeline": "evict"}, "pipelines": {"evict": ["fold_noop_casts", "kv_eviction"]},
            "passes": {"kv_eviction": {"policy": "h2o", "budget": budget, "n_sink": 4, "window": 32}}}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class HFCompiledStatic:
    """HF's own compiled generate: a static cache, with which generate compiles the forward
    itself (CompileConfig: fullgraph, mode="reduce-overhead", i.e. CUDA graphs on CUDA). HF's
    loop copies each step's logits before the next replay; a forward compiled by hand with
    CUDA graphs and called from generate fails on the overwritten output instead."""

    def __init__(self, model, new: int, device):
        from transformers import CompileConfig

        self.model, self.new, self.device = model, new, device
        on_cuda = torch.device(device).type == "cuda"
        self.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if on_cuda else "default")
        # HF compiles automatically on accelerators only; on the CPU it is asked to.
        self.compile_config._compile_all_devices = not on_cuda or None

    def __call__(self, ids) -> dict:
        clock = TokenClock()
        _sync(self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new, do_sample=False,
                                      cache_implementation="static", compile_config=self.compile_config,
                                      streamer=clock, pad_token_id=0)
        _sync(self.device)
        return {"ms_per_token": clock.ms_per_token(), "new_tokens": out.shape[1] - ids.shape[1]}

    def close(self):
        pass


class Path1:
    """torch.compile(model, backend="slimfx", options={"config": config}).generate(...)."""

    def __init__(self, model, new: int, device, config):
        self.compiled = torch.compile(model, backend="slimfx", options={"config": config})
        self.new, self.device = new, device

    def __call__(self, ids) -> dict:
        import slimfx

        _sync(self.device)
        t0 = time.perf_counter()
        # The mask is given: HF would infer one from pad tokens, and random ids hold them.
        out = self.compiled.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new, do_sample=False,
                                     pad_token_id=0)
        _sync(self.device)
        return _slimfx_row(time.perf_counter() - t0, slimfx.last_generate_stats(), out.shape[1] - ids.shape[1])

    def close(self):
        pass


class Runtime:
    def __init__(self, model, new: int, device, config):
        self.model, self.new, self.device, self.config = model, new, device, config

    def __call__(self, ids) -> dict:
        from slimfx.runtime.generate import generate

        _sync(self.device)
        t0 = time.perf_counter()
        tokens, stats = generate(self.model, ids, max_new_tokens=self.new, config=self.config)
        _sync(self.device)
        return _slimfx_row(time.perf_counter() - t0, stats, tokens.shape[1])

    def close(self):
        pass


def _slimfx_row(wall_s: float, stats: dict, new: int) -> dict:
    return {"ms_per_token": 1e3 * (wall_s - stats["prefill_s"]) / (new - 1), "runtime_ms_per_step": stats["ms_per_step"],
            "kv_bytes": stats["kv_bytes"], "cuda_graph": stats["cuda_graph"], "codegen": stats.get("codegen"),
            "new_tokens": new}


def make(name: str, model, new: int, device, budget: int):
    if name == "hf_compiled_static":
        return HFCompiledStatic(model, new, device)
    config = h2o_config(budget) if name.endswith("_h2o") else None
    return (Path1 if name.startswith("path1") else Runtime)(model, new, device, config)


def run_context(model, ctx: int, methods, args) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).to(args.device)
    row = {"context": ctx, "methods": {}}
    # HF's reps run as one block, before the slimfx methods, under their own dynamo reset.
    if "hf_compiled_static" in methods:
        _measure(row, {"hf_compiled_static": None}, model, ids, args)
    _measure(row, {name: None for name in methods if name != "hf_compiled_static"}, model, ids, args)
    for m in row["methods"].values():
        if m.get("reps"):
            m["ms_per_token"] = statistics.median(r["ms_per_token"] for r in m["reps"])
    return row


def _measure(row: dict, runners: dict, model, ids, args) -> None:
    """Warm each method up (one call: compile, capture), then --reps timed calls,
    alternating the order of the methods between reps."""
    ctx = row["context"]
    # Dynamo is reset once per group, not per method: a reset would drop the compiled graphs
    # of the methods warmed before. path1_x and runtime_x share one generator (same model,
    # same configuration), so the second of them to run finds its graphs compiled.
    torch._dynamo.reset()
    for name in list(runners):
        try:
            runners[name] = make(name, model, args.new_tokens, args.device, args.budget)
            t0 = time.perf_counter()
            runners[name](ids)
            row["methods"][name] = {"first_call_s": time.perf_counter() - t0, "reps": []}
            print(f"ctx {ctx} {name}: first call {row['methods'][name]['first_call_s']:.1f} s", flush=True)
        except Exception as exc:  # a method that fails is recorded and said; the others still run
            row["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"ctx {ctx} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            if runners[name] is not None:
                runners[name].close()
            del runners[name]
    try:
        for rep in range(args.reps):
            for name in list(runners) if rep % 2 == 0 else list(runners)[::-1]:
                result = runners[name](ids)
                row["methods"][name]["reps"].append(result)
                print(f"ctx {ctx} rep {rep} {name}: {result['ms_per_token']:.3f} ms/token"
                      + (f" (runtime's ms_per_step {result['runtime_ms_per_step']:.3f})" if "runtime_ms_per_step" in result else ""),
                      flush=True)
    finally:
        for runner in runners.values():
            runner.close()


def targets(row: dict) -> dict:
    """The issue's targets at this context, where both sides were measured."""
    m = {name: v.get("ms_per_token") for name, v in row["methods"].items()}
    out = {}
    if m.get("path1_off") and m.get("runtime_off"):
        out["path1_off_over_runtime_off"] = m["path1_off"] / m["runtime_off"]
        out["path1_within_10pct_of_runtime"] = out["path1_off_over_runtime_off"] <= 1.10
    if m.get("path1_h2o") and m.get("runtime_h2o"):
        out["path1_h2o_over_runtime_h2o"] = m["path1_h2o"] / m["runtime_h2o"]
    if m.get("path1_off") and m.get("hf_compiled_static"):
        out["path1_off_over_hf_compiled"] = m["path1_off"] / m["hf_compiled_static"]
        out["path1_faster_than_hf_compiled"] = m["path1_off"] < m["hf_compiled_static"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="1024,16384", help="comma list of prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=int, default=1024, help="H2O budget (tokens per site)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default="results/bench_h100_generate_door_llama1b.json")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.new_tokens < 4 or args.reps < 1:
        ap.error(f"--methods from {', '.join(METHODS)}; --new-tokens >= 4; --reps >= 1 (got {unknown or ''})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_generate_door: --device cuda but no CUDA GPU here (use --device cpu --shape tiny to smoke-test)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = build(args.shape, dtype, args.device)
    model.generation_config.eos_token_id = None  # random weights: no early stop, every call decodes --new-tokens
    result = {**stamp(args.device), "shape": args.shape, "dtype": str(dtype), "batch": 1, "new_tokens": args.new_tokens,
              "reps": args.reps, "h2o_budget": args.budget, "methods": methods, "rows": []}
    for ctx in (int(c) for c in args.contexts.split(",")):
        row = run_context(model, ctx, methods, args)
        row["targets"] = targets(row)
        result["rows"].append(row)
        summary = ", ".join(f"{k} {v['ms_per_token']:.3f}" for k, v in row["methods"].items() if v.get("ms_per_token"))
        print(f"ctx {ctx}: ms/token {summary}; targets {row['targets']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
