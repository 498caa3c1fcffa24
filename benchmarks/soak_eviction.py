"""Soak: one long generation with KV eviction, watching memory, recompiles and output.

    python benchmarks/soak_eviction.py [--tokens 20000] [--budget 256] [--policy streaming]
                                       [--every 500] [--device cpu|cuda] [--out results/soak_eviction_cpu.json]

The default model (SmolLM2-135M-Instruct) answers one chat prompt and is made to go on
for `--tokens` new tokens (EOS held back), with every attention site evicting down to
`--budget` tokens. Every `--every` tokens it records: the process's resident memory
(and, on CUDA, allocated / peak device memory), the compiled graphs so far, ms per token
over the last interval and how many distinct tokens the interval holds. What it checks:

  * memory flat: resident (or device) memory after the warm-up interval grows by at most
    `--max-growth-mib` by the end,
  * 0 recompiles after warm-up: the compile reports counted at the first sample equal
    those at the end,
  * output stable: no interval collapses to one repeated token, and ms/token of the last
    interval is within 2x of the first timed one.

Writes a JSON file (stamp, settings, samples, verdicts) and prints a table; exit 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def resident_bytes() -> tuple[int, int]:
    """(current, peak) resident memory of this process, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def eviction_config(policy: str, budget: int) -> dict:
    return {"compile": {"pipeline": "evict"}, "pipelines": {"evict": ["fold_noop_casts", "kv_eviction"]},
            "passes": {"kv_eviction": {"policy": policy, "budget": budget}}}


class Recorder:
    """The generate callback: one sample every `every` new tokens."""

    def __init__(self, every: int, device: str):
        self.every, self.device = every, device
        self.samples: list[dict] = []
        self.tokens: list[int] = []
        self.last_time = time.perf_counter()
        self.last_count = 0

    def __call__(self, tokens: torch.Tensor, first_index: int) -> None:
        self.tokens.extend(int(t) for t in tokens[0])
        if len(self.tokens) - self.last_count >= self.every:
            self.sample()

    def sample(self) -> None:
        from slimfx.compiler.report import reports

        now = time.perf_counter()
        window = self.tokens[self.last_count:]
        rss, hwm = resident_bytes()
        row = {"tokens": len(self.tokens), "elapsed_s": now - self.samples[0]["t0"] if self.samples else 0.0,
               "rss_mib": rss / 2**20, "peak_rss_mib": hwm / 2**20, "graphs": len(reports()),
               "ms_per_token": (now - self.last_time) * 1e3 / max(1, len(window)), "distinct": len(set(window))}
        if self.device.startswith("cuda"):
            row["cuda_alloc_mib"] = torch.cuda.memory_allocated() / 2**20
            row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if not self.samples:
            row["t0"] = now
        self.samples.append(row)
        self.last_time, self.last_count = now, len(self.tokens)
        print(f"{row['tokens']:>7} tokens  rss {row['rss_mib']:8.1f} MiB  peak {row['peak_rss_mib']:8.1f} MiB  "
              f"graphs {row['graphs']}  {row['ms_per_token']:6.1f} ms/token  distinct {row['distinct']}", flush=True)


def verdicts(samples: list[dict], max_growth_mib: float) -> dict:
    """The three checks over the samples after the first (warm-up: compiles, first allocations)."""
    if len(samples) < 3:
        return {"error": "fewer than 3 samples: raise --tokens or lower --every"}
    warm, last = samples[1], samples[-1]
    key = "cuda_alloc_mib" if "cuda_alloc_mib" in warm else "rss_mib"
    growth = last[key] - warm[key]
    return {
        "memory_metric": key, "memory_growth_mib": growth, "memory_flat": growth <= max_growth_mib,
        "recompiles_after_warmup": last["graphs"] - samples[0]["graphs"],
        "min_distinct_per_interval": min(s["distinct"] for s in samples),
        "ms_per_token_first_last": [warm["ms_per_token"], last["ms_per_token"]],
        "output_stable": min(s["distinct"] for s in samples) > 1 and last["ms_per_token"] <= 2 * warm["ms_per_token"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--policy", default="streaming")
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    p.add_argument("--out", default="results/soak_eviction_cpu.json")
    args = p.parse_args(argv)

    from slimfx.compiler.report import clear_reports
    from slimfx.measure.report import stamp
    from slimfx.runtime import generate
    from slimfx.runtime.models import chat_input_ids, load_model

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    ids = chat_input_ids(tok, "Tell me a very long story about a lighthouse keeper and the sea.").to(args.device)
    clear_reports()
    rec = Recorder(args.every, args.device)
    start = time.perf_counter()
    _, stats = generate(model, ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, config=eviction_config(args.policy, args.budget),
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, callback=rec, stream_interval=min(64, args.every))
    rec.sample()
    total_s = time.perf_counter() - start
    result = {
        "stamp": stamp(args.device),
        "settings": {**vars(args), "prompt_tokens": int(ids.shape[1]), "dtype": str(dtype)},
        "kv_bytes": stats["kv_bytes"], "total_s": total_s, "decode_ms_per_token": stats["ms_per_step"],
        "samples": [{k: v for k, v in s.items() if k != "t0"} for s in rec.samples],
        "verdicts": verdicts(rec.samples, args.max_growth_mib),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    v = result["verdicts"]
    print(json.dumps(v, indent=1))
    print(f"KV store {stats['kv_bytes'] / 2**20:.2f} MiB; {args.tokens} tokens in {total_s:.0f} s; written {out}")
    ok = v.get("memory_flat") and v.get("recompiles_after_warmup") == 0 and v.get("output_stable")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
