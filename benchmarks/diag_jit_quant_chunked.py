"""Reproduce, with the whole traceback, the JIT failure bench_export.py met on the H100
(2026-12-06): `slimfx.runtime.generate` with a weight-quantization configuration, an explicit
capacity and chunked prefill raised `InternalTorchDynamoError: IndexError` there, while the
same configuration without capacity / prefill_chunk ran, and neither fails on the CPU
(tiny model, FX code or slimfx codegen under the Triton interpreter).

    python benchmarks/diag_jit_quant_chunked.py [--config benchmarks/configs/quant_int8.toml]
"""

from __future__ import annotations

import argparse
import traceback

import torch

from slimfx.measure.shapes import build
from slimfx.runtime.generate import generate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="benchmarks/configs/quant_int8.toml")
    p.add_argument("--shape", default="llama-3.2-1b")
    args = p.parse_args()
    model = build(args.shape, torch.bfloat16, "cuda")
    prompt = torch.randint(1, 1000, (1, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    cases = {"whole prompt, default capacity": {}, "capacity 1280": {"capacity": 1280},
             "prefill_chunk 512": {"prefill_chunk": 512}, "both": {"capacity": 1280, "prefill_chunk": 512}}
    for name, kwargs in cases.items():
        torch._dynamo.reset()
        try:
            out = generate(model, prompt, max_new_tokens=4, config=args.config, **kwargs)
            print(f"{name}: ok, codegen {out.stats.get('codegen')}", flush=True)
        except Exception:
            print(f"{name}: FAILED", flush=True)
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
