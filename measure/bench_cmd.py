"""`slimfx bench`: what a configuration buys in speed.

Decode ms/token and tokens/s at batch 1 and a larger batch, prefill time, achieved GB/s
and its fraction of the measured copy bandwidth, peak memory, KV bytes, cold and warm
compile time, for slimfx and, in the same run, HF eager and HF + inductor
(`reduce-overhead`, StaticCache). Model shapes with random weights (by name) or a
local model. Writes PREFIX.json, PREFIX.md and PREFIX.png.

    slimfx bench --shape smollm2-135m,llama-3.2-1b --output results/bench_h100
    slimfx bench --device cpu --shape tiny          # an explicit CPU measurement
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from slimfx.measure.errors import UsageError

BACKENDS = ("eager", "inductor", "slimfx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="smollm2-135m",
                        help="comma list of named shapes with random weights: smollm2-135m, llama-3.2-1b, llama-3.1-8b, tiny")
    parser.add_argument("--model", default=None, help="a local HF folder or .gguf file instead of --shape")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (an explicit CPU measurement)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before the timed decode steps")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--config", default=None, help="slimfx TOML config for the slimfx backend")
    parser.add_argument("--codegen", default="auto", choices=("auto", "eager", "inductor", "slimfx"),
                        help="how slimfx lowers its graphs: slimfx's own code generator, inductor, FX code; "
                             "auto = the config's compile.codegen, else inductor on CUDA and FX code on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/bench", help="file stem: writes STEM.json, STEM.md, STEM.png")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma list of positive integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: expected a comma list of positive integers")
    return values


def plan(args: argparse.Namespace) -> dict:
    """Check every argument before anything heavy happens."""
    import torch

    from slimfx.measure.report import output_paths
    from slimfx.measure.shapes import SHAPES

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU found: slimfx bench measures GPU speed; pass --device cpu for an explicit CPU measurement")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device}: allowed: cuda, cpu")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"--backends {args.backends}: allowed: {', '.join(BACKENDS)}")
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    if args.model is None:
        bad = [s for s in shapes if s not in SHAPES]
        if bad or not shapes:
            raise UsageError(f"--shape {args.shape}: unknown {', '.join(bad) or 'empty'}; allowed: {', '.join(SHAPES)}")
    else:
        from slimfx.measure.errors import model_source

        model_source(args.model)
        shapes = [args.model]
    for flag, value in (("--context", args.context), ("--steps", args.steps), ("--warmup", args.warmup)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if args.warmup < 3:
        raise UsageError(f"--warmup {args.warmup}: must be at least 3 (CUDA graphs are recorded on the first calls)")
    if args.config is not None:
        from slimfx.compiler.config import load_config

        load_config(args.config)  # ConfigError for a missing or malformed file
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return {"device": device, "backends": backends, "shapes": shapes, "batches": _ints("--batch", args.batch),
            "dtype": dtype, "paths": output_paths(args.output)}


def _load(name: str, args, dtype, device):
    from slimfx.measure.shapes import build

    if args.model is None:
        return build(name, dtype, device, args.seed)
    from slimfx.runtime.models import load_model

    return load_model(args.model, dtype=dtype, device=device)[0]


def run_bench(args, p: dict, on_model=None) -> dict:
    """Every figure of one bench command; `on_model(partial_results)` after each model,
    so a run cut short keeps what it measured."""
    import torch

    from slimfx.measure import bench_run
    from slimfx.measure.footprint import model_footprint
    from slimfx.measure.report import stamp
    from slimfx.measure.timing import copy_bandwidth

    device, dtype = p["device"], getattr(torch, p["dtype"])
    settings = bench_run.BenchSettings(args.context, p["batches"], args.steps, args.warmup, args.config, args.seed, args.codegen)
    copy_gbps = copy_bandwidth(device)
    models = []
    results = {
        "kind": "slimfx-bench",
        "stamp": stamp(str(device)),
        "settings": {"device": str(device), "dtype": p["dtype"], "context": args.context, "batches": list(p["batches"]),
                     "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "config": args.config, "codegen": args.codegen,
                     "weights": "random (seeded); speed does not depend on values" if args.model is None else f"loaded from {args.model}"},
        "copy_bandwidth_gbps": copy_gbps,
        "method": bench_run.__doc__.strip(),
        "models": models,
    }
    for name in p["shapes"]:
        print(f"[bench] {name}: building", file=sys.stderr, flush=True)
        model = _load(name, args, dtype, device)
        fp = model_footprint(model)
        entry = {"shape": name, "parameters": sum(x.numel() for x in model.parameters()),
                 "weight_bytes": fp["weight_bytes"], "kv_bytes_per_token": fp["kv_bytes_per_token"],
                 "layers": model.config.num_hidden_layers, "results": []}
        for backend in p["backends"]:
            print(f"[bench] {name}: {backend}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            res = bench_run.run_backend(backend, model, settings, device)
            bench_run.add_bandwidth(res, copy_gbps)
            res["seconds"] = time.perf_counter() - t
            entry["results"].append(res)
            if "error" in res:
                print(f"[bench] {name}: {backend} failed: {res['error']}", file=sys.stderr, flush=True)
        models.append(entry)
        if on_model is not None:
            on_model(results)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(args: argparse.Namespace) -> int:
    p = plan(args)
    # Cold compile means an empty inductor cache: give this process its own cache folder
    # unless the user chose one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="slimfx-bench-inductor-"))
    from slimfx.measure.bench_report import write_bench
    from slimfx.measure.report import write_json

    results = run_bench(args, p, on_model=lambda partial: write_json(p["paths"]["json"], partial))
    write_bench(results, p["paths"])
    print("\n" + p["paths"]["md"].read_text())
    print("wrote " + ", ".join(str(x) for x in p["paths"].values()), file=sys.stderr)
    return 0
