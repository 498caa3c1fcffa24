"""CPU decode on the default model: HF's eager `generate` against slimfx.runtime.generate
with passes off, in one process, same prompt, alternating; optionally the README demo
(`python -m slimfx run`) timed end to end in a fresh process.

    python benchmarks/bench_cpu_decode.py [--new-tokens 32] [--reps 3] [--threads N] [--demo]
                                          [--out results/bench_cpu_decode.json]

Per-token decode time excludes the prompt: HF's is timed between the first and the last
new token through a streamer (HF's generate calls put() once per token as it is made);
the runtime's is its own `ms_per_step` (steps after the first two). Both decode greedily
the same number of tokens and the tokens are checked equal. The machine may be shared:
every measurement records the 1-minute load average around it, and reps alternate the
two so that load changes hit both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimfx.measure.report import stamp, write_json
from slimfx.measure.timing import TokenClock

PROMPT = "Explain in two sentences why the sky is blue."  # slimfx run's default prompt


def _load() -> float:
    return os.getloadavg()[0]


def hf_eager(model, ids, new: int) -> dict:
    """HF generate (eager, DynamicCache), greedy, exactly `new` tokens."""
    clock = TokenClock()
    load = _load()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, streamer=clock)  # no EOS: exactly `new` tokens
    total = time.perf_counter() - t0
    return {"ms_per_token": clock.ms_per_token(), "first_token_s": clock.times[0] - t0,
            "total_s": total, "load_before": load, "load_after": _load(), "tokens": out[0, ids.shape[1]:].tolist()}


def slimfx_runtime(model, ids, new: int) -> dict:
    from slimfx.runtime.generate import generate

    load = _load()
    t0 = time.perf_counter()
    tokens, stats = generate(model, ids, max_new_tokens=new)
    total = time.perf_counter() - t0
    return {"ms_per_token": stats["ms_per_step"], "first_token_s": stats["prefill_s"], "warmup_s": stats["warmup_s"],
            "total_s": total, "codegen": stats["codegen"], "load_before": load, "load_after": _load(),
            "tokens": tokens[0].tolist()}


def demo(threads: int | None) -> dict:
    """`python -m slimfx run --no-stream` (the README demo) in a fresh process, wall time."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = _load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimfx", "run", "--no-stream"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "returncode": proc.returncode, "load_before": load, "load_after": _load(),
            "stdout_tail": proc.stdout[-1500:], "stderr_tail": proc.stderr[-500:] if proc.returncode else ""}


def _summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per generate call (default 32)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions after one warm-up call each (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--demo", action="store_true", help="also time `python -m slimfx run` in a fresh process")
    ap.add_argument("--out", default="results/bench_cpu_decode.json")
    args = ap.parse_args(argv)
    if args.new_tokens < 4 or args.reps < 1:
        ap.error("--new-tokens must be >= 4 and --reps >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimfx.runtime.models import chat_input_ids, load_model

    t0 = time.perf_counter()
    model, tok = load_model(None, dtype=torch.float32, device="cpu")
    ids = chat_input_ids(tok, PROMPT)
    load_s = time.perf_counter() - t0
    warm_hf = hf_eager(model, ids, 4)
    warm_rt = slimfx_runtime(model, ids, args.new_tokens)  # compiles the prefill and decode graphs
    rows = {"hf_eager": [], "slimfx_runtime": []}
    for rep in range(args.reps):
        order = [("hf_eager", hf_eager), ("slimfx_runtime", slimfx_runtime)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            rows[name].append(fn(model, ids, args.new_tokens))
            r = rows[name][-1]
            print(f"rep {rep} {name:15s} {r['ms_per_token']:7.1f} ms/token  load {r['load_before']:.1f}", flush=True)
    same = all(a["tokens"] == b["tokens"] for a, b in zip(rows["hf_eager"], rows["slimfx_runtime"]))
    hf, rt = _summary(rows["hf_eager"], "ms_per_token"), _summary(rows["slimfx_runtime"], "ms_per_token")
    result = {
        **stamp("cpu"), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "model": "SmolLM2-135M-Instruct fp32",
        "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "reps": args.reps, "model_load_s": load_s,
        "first_runtime_call": {k: v for k, v in warm_rt.items() if k != "tokens"}, "hf_warmup_ms_per_token": warm_hf["ms_per_token"],
        "same_tokens": same, "hf_eager_ms_per_token": hf, "slimfx_runtime_ms_per_token": rt,
        "runtime_over_hf_median": rt["median"] / hf["median"],
        "runs": {name: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for name, rs in rows.items()},
    }
    print(f"decode ms/token (median of {args.reps}): HF eager {hf['median']:.1f}, slimfx runtime {rt['median']:.1f} "
          f"({result['runtime_over_hf_median']:.2f}x); same tokens: {same}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)  # now, and again with the demo: a stopped demo keeps the decode figures
    if args.demo:
        result["demo"] = demo(args.threads)
        print(f"python -m slimfx run: {result['demo']['wall_s']:.1f} s wall (rc {result['demo']['returncode']})", flush=True)
        write_json(out, result)
    print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
