"""Layer skipping: acceptance of self-speculative drafts (CPU, real weights) and decode speed
(GPU): decode time against blocks removed, self-speculative round time and speedup.

    python benchmarks/bench_layer_skip.py acceptance --out results/layer_skip_acceptance.json
    python benchmarks/bench_layer_skip.py speed --acceptance results/layer_skip_acceptance.json \
        --out results/bench_h100_layer_skip.json

acceptance: the embedded SmolLM2-135M-Instruct (real weights), greedy, batch 1, each fixed
chat prompt (measure/speculative.py): per draft and draft length K, the acceptance rate,
tokens per verification round, and whether the tokens equal plain greedy generation.

speed (one GPU, bf16, batch 1, every loop in CUDA graphs):
- the Llama-3.2-1B shape (random weights): HF + inductor (reduce-overhead, StaticCache)
  and slimfx decode ms/token, then slimfx with 0, 10, 20, 30 % of the blocks removed
  (evenly spread intermediate blocks, passes/layer_skip.spread); the ratio of each
  decode time to the full model's against the share of blocks left;
- self-speculative rounds on the same shape with the draft length fixed at K: a round's
  work does not depend on what is accepted, so the measured round time R_K with the
  tokens per round measured on real weights (acceptance JSON, same draft and K) gives
  the speedup tokens_per_round * t_full / R_K; the random weights' own acceptance is
  reported beside it and not used;
- SmolLM2-135M with its real weights end to end: plain greedy vs self-speculative
  (measured speedup and acceptance, tokens checked identical).
Writes one JSON (device, date, versions, every number) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slimfx.measure.report import stamp, write_json
from slimfx.passes.layer_skip import spread

SHARES = (0.0, 0.1, 0.2, 0.3)


def drafts_for(n_blocks: int) -> dict:
    """The drafts measured: 20 % and 30 % of the MLPs, 10 % and 20 % of the blocks, evenly spread."""
    def count(share):
        return max(1, round(share * n_blocks))

    return {"mlp20": {"blocks": spread(count(0.2), n_blocks), "mlp_only": True},
            "mlp30": {"blocks": spread(count(0.3), n_blocks), "mlp_only": True},
            "block10": {"blocks": spread(count(0.1), n_blocks)},
            "block20": {"blocks": spread(count(0.2), n_blocks)}}


def run_acceptance(args) -> dict:
    from slimfx.measure.speculative import acceptance
    from slimfx.runtime.models import DEFAULT_MODEL_NAME, load_model

    model, tok = load_model()
    drafts = drafts_for(model.config.num_hidden_layers)
    if args.drafts:
        drafts = {k: drafts[k] for k in args.drafts.split(",")}
    rows = acceptance(model, tok, drafts, lengths=tuple(int(k) for k in args.lengths.split(",")), new_tokens=args.new_tokens,
                      adaptive_length=args.adaptive or None, log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"kind": "slimfx.layer_skip_acceptance", "stamp": stamp("cpu"), "model": DEFAULT_MODEL_NAME,
            "settings": {"new_tokens": args.new_tokens, "prompts": 4, "batch": 1, "greedy": True, "dtype": "float32"},
            "method": __import__("slimfx.measure.speculative", fromlist=["x"]).__doc__.strip(), "rows": rows}


def _ms_per_token(model, ids, new: int, config=None) -> tuple[float, dict]:
    from slimfx.runtime.generate import generate

    generate(model, ids, max_new_tokens=new, config=config)  # compiles, captures
    out = generate(model, ids, max_new_tokens=new, config=config)
    return 1e3 * out.stats["decode_s"] / max(1, out.stats.get("decode_steps", new - 1)), out.stats


def _config(layer_skip: dict | None) -> dict | None:
    if layer_skip is None:
        return None
    return {"pipelines": {"s": ["layer_skip"]}, "compile": {"pipeline": "s"}, "passes": {"layer_skip": layer_skip}}


def speed_by_blocks(model, ids, new: int) -> list[dict]:
    n = model.config.num_hidden_layers
    rows, full = [], None
    for share in SHARES:
        count = round(share * n)
        cfg = _config({"blocks": spread(count, n)}) if count else None
        ms, stats = _ms_per_token(model, ids, new, cfg)
        full = full or ms
        rows.append({"share_removed": share, "blocks_removed": count, "ms_per_token": ms, "ratio_to_full": ms / full,
                     "blocks_left_share": (n - count) / n, "kv_bytes": stats["kv_bytes"]})
        print(f"[speed] {count}/{n} blocks removed: {ms:.3f} ms/token ({ms / full:.3f} of full; {(n - count) / n:.3f} of blocks left)",
              file=sys.stderr, flush=True)
    return rows


def speculative_rounds(model, ids, new: int, t_full: float, accepted: dict, lengths) -> list[dict]:
    from slimfx.runtime.generate import generate

    rows = []
    for name, draft in drafts_for(model.config.num_hidden_layers).items():
        for k in lengths:
            cfg = _config({**draft, "mode": "speculative", "draft_length": k, "adaptive_draft": False})
            generate(model, ids, max_new_tokens=new, config=cfg)
            stats = generate(model, ids, max_new_tokens=new, config=cfg).stats
            round_ms = stats["ms_per_round"]  # warm rounds only (no compile, warm-up or graph capture)
            real = accepted.get((name, k))
            row = {"draft": name, "draft_length": k, "round_ms": round_ms, "draft_cost": stats["draft_cost"],
                   "random_weights_acceptance": stats["acceptance_rate"],
                   "real_weights_tokens_per_round": real, "projected_speedup": real * t_full / round_ms if real else None}
            rows.append(row)
            print(f"[speed] speculative {name} K={k}: round {round_ms:.3f} ms; projected speedup "
                  f"{row['projected_speedup'] if real else 'n/a (no acceptance row)'}", file=sys.stderr, flush=True)
    return rows


def real_weights_end_to_end(new: int, lengths, device) -> list[dict]:
    from slimfx.measure.fidelity import DEFAULT_PROMPTS
    from slimfx.runtime.generate import generate
    from slimfx.runtime.models import chat_input_ids, load_model

    model, tok = load_model(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    ids = chat_input_ids(tok, DEFAULT_PROMPTS[0]).to(device)
    t_full, _ = _ms_per_token(model, ids, new)
    ref = generate(model, ids, max_new_tokens=new).tokens
    rows = [{"draft": "none", "ms_per_token": t_full}]
    for name, draft in drafts_for(model.config.num_hidden_layers).items():
        for k, adaptive in [(k, False) for k in lengths] + [(6, True)]:
            cfg = _config({**draft, "mode": "speculative", "draft_length": k, "adaptive_draft": adaptive})
            generate(model, ids, max_new_tokens=new, config=cfg)
            out = generate(model, ids, max_new_tokens=new, config=cfg)
            ms = out.stats["ms_per_token"]  # warm rounds only
            rows.append({"draft": name, "draft_length": k, "adaptive": adaptive, "ms_per_token": ms, "speedup": t_full / ms,
                         "acceptance_rate": out.stats["acceptance_rate"], "tokens_per_round": out.stats["tokens_per_round"],
                         "identical": bool(torch.equal(out.tokens, ref))})
            print(f"[speed] SmolLM2 real weights {name} K={k}{' adaptive' if adaptive else ''}: {t_full / ms:.3f}x, "
                  f"acceptance {out.stats['acceptance_rate']:.3f}", file=sys.stderr, flush=True)
    return rows


def _acceptance_rows(path: str | None) -> dict:
    """(draft, K) -> tokens per round measured on real weights (fixed-K rows of the acceptance JSON)."""
    if not path:
        return {}
    if not Path(path).is_file():
        print(f"[speed] no acceptance file {path}: round times only, no projected speedup", file=sys.stderr)
        return {}
    return {(row["draft"], row["draft_length"]): row["tokens_per_round"]
            for row in json.loads(Path(path).read_text())["rows"] if not row["adaptive"]}


def run_speed(args, save) -> dict:
    """Every stage in args.stages; `save(result)` after each, so a run stopped at its time
    limit keeps the stages it finished."""
    from slimfx.measure.bench_run import BenchSettings, run_backend
    from slimfx.measure.shapes import build

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stages = set(args.stages.split(","))
    lengths = tuple(int(k) for k in args.lengths.split(","))
    result = {"kind": "slimfx.layer_skip_speed", "stamp": stamp(str(device)),
              "settings": {"shape": args.shape, "context": args.context, "new_tokens": args.new_tokens, "batch": 1,
                           "dtype": "bfloat16" if device.type == "cuda" else "float32", "acceptance_file": args.acceptance,
                           "stages": sorted(stages)},
              "method": __doc__.strip(), "hf_inductor": None, "by_blocks_removed": None, "speculative_rounds": None,
              "real_weights_smollm2": None}
    if stages & {"hf", "blocks", "rounds"}:
        if args.layers:  # a CPU smoke run of this script: the tiny shape has too few blocks to skip any
            from slimfx.runtime.models import tiny_model

            model = tiny_model("llama_gqa", layers=args.layers).to(device, dtype)
        else:
            model = build(args.shape, dtype, device, 0)
        ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0)).to(device)
        if "hf" in stages:
            result["hf_inductor"] = run_backend("inductor", model, BenchSettings(args.context, (1,), args.new_tokens, 8), device)
            save(result)
        if stages & {"blocks", "rounds"}:
            result["by_blocks_removed"] = speed_by_blocks(model, ids, args.new_tokens)
            save(result)
        if "rounds" in stages:
            t_full = result["by_blocks_removed"][0]["ms_per_token"]
            result["speculative_rounds"] = speculative_rounds(model, ids, args.new_tokens, t_full,
                                                              _acceptance_rows(args.acceptance), lengths)
            save(result)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "real" in stages:
        result["real_weights_smollm2"] = real_weights_end_to_end(args.new_tokens, lengths, device)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("acceptance", help="CPU: acceptance on the default model's real weights")
    a.add_argument("--new-tokens", type=int, default=32)
    a.add_argument("--lengths", default="2,4", help="fixed draft lengths K")
    a.add_argument("--adaptive", type=int, default=6, help="also an adaptive run with this longest K (0: none)")
    a.add_argument("--drafts", default=None, help="comma list of mlp20, mlp30, block10, block20 (default: all)")
    a.add_argument("--out", default="results/layer_skip_acceptance.json")
    s = sub.add_parser("speed", help="GPU: decode time vs blocks removed, self-speculative speedup")
    s.add_argument("--shape", default="llama-3.2-1b")
    s.add_argument("--context", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--lengths", default="2,4")
    s.add_argument("--acceptance", default="results/layer_skip_acceptance.json")
    s.add_argument("--out", default="results/bench_h100_layer_skip.json")
    s.add_argument("--device", default="cuda")
    s.add_argument("--layers", type=int, default=0, help="smoke run: a tiny random model with this many blocks instead of --shape")
    s.add_argument("--stages", default="hf,blocks,rounds,real",
                   help="comma list: hf (HF + inductor baseline), blocks (decode vs blocks removed), rounds (speculative "
                        "round times; needs blocks' full-model time, so it runs blocks too), real (SmolLM2 end to end)")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        write_json(out, result)
        print(f"wrote {out}", file=sys.stderr, flush=True)

    save(run_acceptance(args) if args.what == "acceptance" else run_speed(args, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
