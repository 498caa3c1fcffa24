"""`slimfx export`: run the configured passes once and write a package that generates
without compiling (export/: the build, the manifest, the loader)."""

from __future__ import annotations

import argparse
import time

from slimfx.compiler.config import load_config
from slimfx.compiler.errors import UsageError

def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimfx.compiler.cmd_run import add_model_arguments

    add_model_arguments(p)  # a package runs on the device kind it was built for
    p.add_argument("--out", required=True, help="the package folder to write")
    p.add_argument("--max-batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--capacity", type=int, default=2048, help="KV slots per attention site: prompt + new tokens at most (default 2048)")
    p.add_argument("--chunk", type=int, default=64, help="prefill tokens per step, a power of two >= 16 (default 64)")
    p.add_argument("--force", action="store_true", help="replace an existing package folder")
    p.add_argument("--compile", choices=("auto", "aoti", "none"), default="auto",
                   help="compile the step graphs with AOTInductor (aoti, CPU only), or run them through torch.export's "
                        "interpreter (none, and auto)")


def main(args: argparse.Namespace) -> int:
    from slimfx.compiler.cmd_run import check_device, model_dtype
    from slimfx.export.build import export_package
    from slimfx.export.package import describe_manifest
    from slimfx.export.manifest import read_manifest
    from slimfx.runtime.models import DEFAULT_MODEL_NAME, load_model

    device = check_device(args.device)
    dtype = model_dtype(args.dtype, device)
    config = load_config(args.config or _default_config_path())  # fail fast, before loading weights
    t0 = time.perf_counter()
    print("[0/5] loading the model", flush=True)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    out = export_package(model, args.out, config=config, tokenizer=tokenizer, batch=args.max_batch, capacity=args.capacity,
                         chunk=args.chunk, model_name=args.model or DEFAULT_MODEL_NAME, overwrite=args.force, compile=args.compile,
                         progress=lambda line: print(line, flush=True))
    print(f"\npackage written to {out} in {time.perf_counter() - t0:.1f} s\n")
    print(describe_manifest(read_manifest(out)))
    return 0


def _default_config_path():
    from slimfx.compiler.cli import DEFAULT_CONFIG

    return DEFAULT_CONFIG
