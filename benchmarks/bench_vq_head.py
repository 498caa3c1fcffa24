"""Benchmark of the VQ logits head (issue 7): the head alone and end-to-end decode.

    python benchmarks/bench_vq_head.py [--out results/bench_vq_head.json] [--no-e2e]

On one GPU, in the same run, batch 1, bf16, every variant captured in a CUDA graph
(so launch overhead is not what is timed), slimfx.measure.timing medians:
  * the head alone for vocab 49152 x hidden 576 and 128256 x 2048, K = 1024 codes:
    plain bf16 head (F.linear = cuBLAS) with and without argmax; approx head (+argmax);
    exact head on the route where the bound proves, and on the full-head fallback route.
  * end-to-end decode step on the Llama-3.2-1B shape (examples/gptfast_model.py, static
    KV cache of 1024 positions, eager ops in a CUDA graph) with each head.

Head weights: synthetic clustered rows, W[t] = u_{t mod K} + noise, u unit-norm random
directions, noise N(0, 0.3^2 / H) per coordinate (row norm ~1, cluster radius ~0.3).
The codebook is built from the known clusters (no k-means: the GPU minutes are few).
Such a head is friendlier to the bound than SmolLM2's real head (on which the bound
proved 0 of 97 steps, see results/vq_logits.md): the proved-route time is what the
exact head costs *when* the bound proves; the fallback time is what it costs otherwise.
Hidden states: proved route h = 8 * W[t] + small noise; fallback route h ~ N(0, 1).
Writes one JSON (device, date, versions, every number) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from slimfx.measure.shapes import SHAPES
from slimfx.measure.timing import time_ms

HEADS = [(SHAPES[name]["vocab_size"], SHAPES[name]["hidden_size"]) for name in ("smollm2-135m", "llama-3.2-1b")]  # (V, H)
K = 1024
PROBES = 8


def clustered_head(v: int, h: int, k: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    u = F.normalize(torch.randn(k, h, device="cuda", generator=gen), dim=1)
    codes = torch.arange(v, device="cuda") % k
    w = u[codes] + 0.3 / h**0.5 * torch.randn(v, h, device="cuda", generator=gen)
    return w.to(torch.bfloat16), codes


def head_rows(v: int, h: int) -> tuple[list[dict], dict]:
    from slimfx.calibrate.vq_head import cluster_statistics
    from slimfx.runtime import vq_head as rt

    w, codes = clustered_head(v, h, K)
    stats = cluster_statistics(w, codes, K)
    cb = stats["codebook"].to("cuda", torch.bfloat16)
    t2c = stats["token_to_code"].cuda()
    members = stats["members"].cuda()
    slack = rt.exact_slack(w, cb, members)
    counters = rt.new_counters(f"bench_{v}", "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    h_proved = (8 * w[12345 % v].float() + 0.01 * torch.randn(h, device="cuda", generator=gen)).to(torch.bfloat16)[None]
    h_random = torch.randn(1, h, device="cuda", generator=gen).to(torch.bfloat16)

    def exact(x):
        return torch.ops.slimfx.vq_head_exact(x, w, cb, slack, members, counters, PROBES)

    check = {}
    for name, x in (("proved", h_proved), ("fallback", h_random)):
        _, proved, token = rt.exact_head(x, w, cb, slack, members, PROBES)
        full_tok = F.linear(x.float(), w.float()).argmax(-1)
        check[name] = {"proved": bool(proved.item()), "argmax_equal": bool(exact(x).argmax(-1).item() == full_tok.item()),
                       "token_equal": bool(token.item() == full_tok.item()) if proved.item() else None}
    times = {
        "bf16 F.linear": 1e3 * time_ms(lambda: F.linear(h_random, w), graph=True, repeats=200),
        "bf16 F.linear + argmax": 1e3 * time_ms(lambda: F.linear(h_random, w).argmax(-1), graph=True, repeats=200),
        "approx + argmax": 1e3 * time_ms(lambda: torch.ops.slimfx.vq_head_approx(h_random, cb, t2c, None).argmax(-1), graph=True, repeats=200),
        "approx (no argmax)": 1e3 * time_ms(lambda: torch.ops.slimfx.vq_head_approx(h_random, cb, t2c, None), graph=True, repeats=200),
        "exact, bound proves (no argmax)": 1e3 * time_ms(lambda: exact(h_proved), graph=True, repeats=200),
        "exact, bound proves + argmax": 1e3 * time_ms(lambda: exact(h_proved).argmax(-1), graph=True, repeats=200),
        "exact, fallback + argmax": 1e3 * time_ms(lambda: exact(h_random).argmax(-1), graph=True, repeats=200),
    }
    base = times["bf16 F.linear + argmax"]
    rows = [{"vocab": v, "hidden": h, "k": K, "probes": PROBES, "variant": n, "us": t, "speedup_vs_bf16_argmax": base / t}
            for n, t in times.items()]
    return rows, {"check": check, "weights": (w, cb, t2c, members, slack)}


class _Head(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def e2e_rows(head_state) -> list[dict]:
    """Decode step (tokens -> next token) of the Llama-3.2-1B shape with each head."""
    from slimfx.runtime import vq_head as rt
    from slimfx.runtime.models import load_example_module

    gf = load_example_module("gptfast_model")
    args = gf.ModelArgs(vocab_size=128256, n_layer=16, n_head=32, n_local_heads=8, dim=2048,
                        intermediate_size=8192, max_seq_len=1024, rope_base=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = gf.Transformer(args).to(torch.bfloat16).eval()
        model.setup_caches(1)
    w, cb, t2c, members, slack = head_state["weights"]
    with torch.no_grad():
        model.output.weight.copy_(w)  # the clustered synthetic head
    counters = rt.new_counters("bench_e2e", "cuda")
    heads = {
        "bf16 F.linear": model.output,
        "approx": _Head(lambda x: torch.ops.slimfx.vq_head_approx(x, cb, t2c, None)),
        "exact": _Head(lambda x: torch.ops.slimfx.vq_head_exact(x, w, cb, slack, members, counters, PROBES)),
    }
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([1000], device="cuda")
    plain = model.output
    rows = []
    for name, head in heads.items():
        model.output = head

        def step():
            with torch.no_grad():
                return model(tok, pos).argmax(-1)

        rows.append({"shape": "Llama-3.2-1B", "context": 1024, "head": name, "us_per_step": 1e3 * time_ms(step, graph=True, repeats=100)})
    model.output = plain
    rt.reset_counts()
    with torch.no_grad():
        model.output = heads["exact"]
        model(tok, pos)
        model.output = plain
    rows.append({"route_counts_e2e_exact": rt.route_counts("bench_e2e")})
    base = rows[0]["us_per_step"]
    for r in rows[:3]:
        r["speedup_vs_bf16"] = base / r["us_per_step"]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench_vq_head.json")
    p.add_argument("--no-e2e", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_vq_head: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import slimfx.runtime.vq_head  # noqa: F401  registers the ops

    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "heads": [], "checks": {}, "e2e": []}
    state = None
    for v, h in HEADS:
        rows, state = head_rows(v, h)
        result["heads"] += rows
        result["checks"][f"{v}x{h}"] = state["check"]
        for r in rows:
            print(f"{v:>7} x {h:<5} {r['variant']:<32} {r['us']:9.1f} us  x{r['speedup_vs_bf16_argmax']:.2f}", flush=True)
        print(f"  checks: {state['check']}", flush=True)
    if not a.no_e2e:
        result["e2e"] = e2e_rows(state)
        for r in result["e2e"]:
            print(r, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
