"""slimfx's eviction policies against a peer library's presses (kvpress) on the same
prompts: the RULER-style suite and passkey of `slimfx eval` (same seeds and lengths).

Each press compresses the whole prompt once, after it is prefilled in one forward (the
setting of slimfx's default `prefill_chunk = 0`), to the number of tokens slimfx's
`budget_fraction` keeps (ceil(f * T / 16) * 16); decoding is greedy through the
compressed HF cache with true positions, as kvpress's own pipeline does. kvpress is
not a dependency: install it beside slimfx (e.g. `pip install --no-deps --target DIR
kvpress` and put DIR on PYTHONPATH).

    python benchmarks/compare_kvpress.py --fraction 0.25 --presses tova,snapkv,streaming,h2o \\
        --lengths 1024 --samples 2 --depths 0.25,0.75 --slimfx results/eval_kv_eviction_ruler_f025.json \\
        --output results/compare_kvpress_f025.json

`--slimfx` (one or more eval JSONs) puts slimfx's scores on the same prompts beside each press's (kvpress has
no A2SF, Keyformer, D2O, TokenSelect or TidalDecode press; its H2O is
ObservedAttentionPress, which needs eager attention).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _kvpress_for_this_transformers() -> None:
    """transformers 5.2x hands attention layers the cache as `cache`; kvpress 0.5 reads
    `past_key_values`: give its hook both names."""
    from kvpress.presses import base_press

    original = base_press.BasePress.forward_hook

    def hook(self, module, input, kwargs, output):
        if "past_key_values" not in kwargs and "cache" in kwargs:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        if "cache_position" not in kwargs:  # this forward's positions in the (uncompressed) cache
            q_len = kwargs["hidden_states"].shape[1]
            held = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            kwargs = {**kwargs, "cache_position": torch.arange(held - q_len, held)}
        return original(self, module, input, kwargs, output)

    base_press.BasePress.forward_hook = hook


def press_for(name: str, ratio: float):
    import kvpress

    return {"tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
            "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
            "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
            "h2o": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio)}[name]()


# kvpress's H2O (ObservedAttentionPress) scores keys by the attention weights the prompt's
# forward returns, which only eager attention materialises.
EAGER_PRESSES = ("h2o",)


@torch.no_grad()
def answer(model, tokenizer, ids: torch.Tensor, press, max_new_tokens: int) -> tuple[str, int]:
    """Greedy answer and the tokens layer 0's cache held after the prompt."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        out = model(input_ids=ids.to(model.device), past_key_values=cache, logits_to_keep=1)
    held = cache.get_seq_length(0)
    new = [int(out.logits[0, -1].argmax())]
    pos = ids.shape[1]
    for i in range(max_new_tokens - 1):
        if new[-1] == tokenizer.eos_token_id:
            break
        out = model(input_ids=torch.tensor([[new[-1]]], device=model.device), past_key_values=cache,
                    position_ids=torch.tensor([[pos + i]], device=model.device))
        new.append(int(out.logits[0, -1].argmax()))
    return tokenizer.decode(new, skip_special_tokens=True), held


def main() -> None:
    from slimfx.measure import passkey, ruler
    from slimfx.runtime.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--presses", default="tova,snapkv,streaming")
    ap.add_argument("--lengths", default="1024", help="prompt lengths in tokens (comma list), as `slimfx eval --ruler-lengths`")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", required=True)
    ap.add_argument("--slimfx", nargs="+", default=[], help="`slimfx eval --ruler` JSONs on the same prompts to compare with")
    args = ap.parse_args()
    _kvpress_for_this_transformers()
    torch.manual_seed(0)
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tokenizer = load_model(None, dtype=torch.float32, device=args.device)
    cases = ruler.build_cases(tokenizer, ruler.TASKS, tuple(lengths), args.samples, 0)
    keys = passkey.build_cases(tokenizer, lengths, [float(d) for d in args.depths.split(",")], 1, 0)
    from slimfx.measure.report import stamp

    results = {"stamp": stamp(args.device), "fraction": args.fraction, "lengths": lengths, "samples": args.samples, "depths": args.depths,
               "kvpress": __import__("kvpress").__version__ if hasattr(__import__("kvpress"), "__version__") else "0.5.5",
               "presses": {}}
    for name in args.presses.split(","):
        model.set_attn_implementation("eager" if name in EAGER_PRESSES else "sdpa")
        t0 = time.perf_counter()
        records = []
        for c in cases:
            kept = math.ceil(args.fraction * c.n_tokens / 16) * 16
            text, held = answer(model, tokenizer, c.input_ids, press_for(name, 1 - kept / c.n_tokens), ruler.NEW_TOKENS[c.task])
            records.append({"task": c.task, "answers": list(c.answers), "answer": text, "score": ruler.score(text, c.answers), "kept": kept, "held": held})
        found = []
        for c in keys:
            kept = math.ceil(args.fraction * c.n_tokens / 16) * 16
            text, held = answer(model, tokenizer, c.input_ids, press_for(name, 1 - kept / c.n_tokens), 16)
            found.append({"depth": c.depth, "answer": text, "found": c.key in text.replace(" ", ""), "held": held})
        results["presses"][name] = {"ruler": ruler.summarize(records), "ruler_cases": records,
                                    "passkey": sum(f["found"] for f in found) / len(found), "passkey_cases": found,
                                    "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps({k: results["presses"][name][k] for k in ("ruler", "passkey", "seconds")}), flush=True)
    if args.slimfx:
        results["versus_slimfx"] = {name: row for path in args.slimfx for name, row in versus_slimfx(results, path, args.fraction).items()}
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


def versus_slimfx(results: dict, eval_json: str, fraction: float) -> dict:
    """Per policy, slimfx's scores (a `slimfx eval --ruler` JSON swept over kv.policy at this
    fraction) beside the press's, after checking that both scored the same prompts."""
    data = json.loads(open(eval_json).read())
    rows = {}
    for cfg in data["configurations"]:
        name = cfg["values"].get("kv.policy")
        if name not in results["presses"] or abs(cfg["values"].get("kv.budget_fraction", -1) - fraction) > 1e-9:
            continue
        ours, theirs = cfg["ruler"]["cases"], results["presses"][name]["ruler_cases"]
        if [(c["task"], c["answers"]) for c in ours] != [(c["task"], c["answers"]) for c in theirs]:
            raise SystemExit(f"{eval_json}: its RULER cases differ from this run's (same --lengths, --samples and seed 0?)")
        press = results["presses"][name]
        rows[name] = {"slimfx_ruler": cfg["ruler"]["summary"]["average"], "kvpress_ruler": press["ruler"]["average"],
                      "slimfx_passkey": cfg["passkey"]["summary"]["accuracy"], "kvpress_passkey": press["passkey"]}
        print(f"{name}: RULER slimfx {rows[name]['slimfx_ruler']:.3f} vs kvpress {rows[name]['kvpress_ruler']:.3f}; "
              f"passkey {rows[name]['slimfx_passkey']:.2f} vs {rows[name]['kvpress_passkey']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
