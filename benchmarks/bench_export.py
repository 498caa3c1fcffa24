"""Ahead-of-time export against the JIT path, each step in a fresh process (GPU).

For one model shape (random weights) and configuration, at a given context:
  jit-cold   first generate in a fresh process with an empty compile cache: load-to-first-token
  jit-warm   the same again, caches kept (dynamo, inductor and autotune caches on disk)
  export     `slimfx export` wall time (AOTInductor included on CUDA), package size, how each step program runs
  package    a fresh process: load_package + first token, then decode ms/token
Decode ms/token of the JIT path comes from its warm run. Writes JSON with device, date
and versions.

    PYTHONPATH=<folder holding slimfx> python3 benchmarks/bench_export.py --shape llama-3.2-1b --context 1024 \
        [--config FILE ...] --output results/bench_export
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


_COMMON = """
import json, sys, time
t0 = time.perf_counter()
import torch
from slimfx.measure.shapes import build
prompt = torch.randint(1, 1000, (1, {context}), generator=torch.Generator().manual_seed(0)).cuda()
"""

_JIT = _COMMON + """
from slimfx.runtime.generate import generate
model = build({shape!r}, torch.bfloat16, "cuda")
t1 = time.perf_counter()
out = generate(model, prompt, max_new_tokens=2, capacity={capacity}, config={config!r}, prefill_chunk={chunk})
torch.cuda.synchronize()
first = time.perf_counter() - t1
out = generate(model, prompt, max_new_tokens={steps}, capacity={capacity}, config={config!r}, prefill_chunk={chunk})
print(json.dumps({{"first_token_s": first, "process_s": time.perf_counter() - t0, "ms_per_token": out.stats["ms_per_step"]}}))
"""

_EXPORT = _COMMON + """
from slimfx.export.build import export_package
model = build({shape!r}, torch.bfloat16, "cuda")
t1 = time.perf_counter()
export_package(model, {package!r}, config={config!r}, batch=1, capacity={capacity}, chunk={chunk}, progress=lambda _: None, overwrite=True)
export_s = time.perf_counter() - t1
programs = json.load(open({package!r} + "/manifest.json"))["programs"]
print(json.dumps({{"export_s": export_s, "programs": [{{k: p.get(k) for k in ("tokens", "runner", "aoti_failed")}} for p in programs]}}))
"""

_PACKAGE = _COMMON + """
import slimfx
t1 = time.perf_counter()
pkg = slimfx.load_package({package!r})
load = time.perf_counter() - t1
pkg.generate(prompt, max_new_tokens=2)
torch.cuda.synchronize()
first = time.perf_counter() - t1
out = pkg.generate(prompt, max_new_tokens={steps})
print(json.dumps({{"load_s": load, "load_stages_s": pkg.load_times, "first_token_s": first, "process_s": time.perf_counter() - t0, "ms_per_token": out.stats["ms_per_step"],
                  "transformers_imported": any(m.startswith("transformers.models") for m in sys.modules)}}))
"""


def _run(template: str, env: dict, **fields) -> dict:
    script = textwrap.dedent(template.format(**fields))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--config", action="append", default=[],
                   help="a configuration file (repeatable); 'none' or no --config: passes off")
    p.add_argument("--jit", choices=("all", "first"), default="all",
                   help="measure the JIT path (cold and warm) for every configuration, or for the first only "
                        "(the others: export and package only; the JIT's cold compile is the slowest step)")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    from slimfx.measure.report import stamp

    rows = []
    capacity = -(-(args.context + args.steps + 8) // 256) * 256
    configs = [None if c == "none" else c for c in args.config] or [None]
    for i, config in enumerate(configs):
        with tempfile.TemporaryDirectory() as cache:
            # PYTHONPATH as the caller set it (a folder holding the package as `slimfx`).
            env = dict(os.environ, SLIMFX_CACHE_DIR=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
            fields = dict(shape=args.shape, context=args.context, capacity=capacity, config=config, chunk=args.chunk,
                          steps=args.steps, package=os.path.join(cache, "pkg"))
            row = {"config": config or "passes off"}
            if args.jit == "all" or i == 0:
                row.update(jit_cold=_run(_JIT, env, **fields), jit_warm=_run(_JIT, env, **fields))
            row.update(export=_run(_EXPORT, env, **fields), package=_run(_PACKAGE, env, **fields))
            pkg = Path(fields["package"])
            row["package_bytes"] = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) if pkg.exists() else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"stamp": stamp("cuda"), "shape": args.shape, "context": args.context, "steps": args.steps, "rows": rows}
    Path(args.output).with_suffix(".json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
