"""DuoAttention head calibration: which kv heads are retrieval heads.

    slimfx calibrate duo-heads --out duo_heads.safetensors [--model PATH] [--lengths 1024,2048]

DuoAttention keeps a full KV store for "retrieval heads" and only sinks + a recent window
for "streaming heads". The paper learns a gate per head by distillation on synthetic
passkey data; this calibration is training-free and measures the behaviour the gate
selects for directly: on synthetic passkey prompts (seeded, disjoint from `slimfx eval`'s
keys), the unmodified model is teacher-forced through the answer "The pass key is KEY.",
and every head's attention mass on the hidden key's tokens is averaged over the steps
that emit a key digit. A head that copies the key puts its mass there; a streaming head
(sinks + recent) could not see those tokens, so these are the heads that must keep the
full cache. Scores are averaged over each kv head's GQA group (the store is per kv head).

The artifact (safetensors; its format: passes/kv_eviction/retrieval_heads.py) holds
`retrieval_score` [n_layers, n_kv_heads] float32 and metadata (model, prompt lengths,
depths, seed, method). The `kv_eviction` pass with policy "duo" keeps the top
`retrieval_fraction` of all heads as retrieval heads.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slimfx.calibrate.common import attention_weights
from slimfx.compiler.errors import UsageError
from slimfx.passes.kv_eviction.retrieval_heads import save, select_retrieval

CALIBRATION_SEED = 1000  # slimfx eval's passkey prompts use seed 0: calibration never sees them
ANSWER = "The pass key is {key}."


def _digit_positions(tokenizer, ids: list[int], key: str) -> list[int]:
    """Positions of tokens that are (parts of) the key's digits."""
    return [i for i, t in enumerate(ids) if (s := tokenizer.decode([t]).strip()) and s.isdigit() and s in key]


def _needle_mass(weights: torch.Tensor, where: dict) -> torch.Tensor:
    """[Hq] attention mass of the query rows that emit a key digit on the needle's digit
    keys (`where["rows"]`, `where["cols"]`), summed over keys and averaged over rows."""
    return weights[:, where["rows"]][:, :, where["cols"]].sum(-1).mean(-1).float().cpu()


def _case_mass(model, tokenizer, mass: list, where: dict, case) -> torch.Tensor:
    """[n_layers, Hq] attention mass on the needle while the answer's key digits are emitted
    (`mass`: the list attention_weights fills, with _needle_mass at `where`)."""
    prompt = case.input_ids[0].tolist()
    answer = tokenizer(ANSWER.format(key=case.key), add_special_tokens=False).input_ids
    ids = prompt + answer
    needle = _digit_positions(tokenizer, prompt, case.key)
    emit = [len(prompt) + p - 1 for p in _digit_positions(tokenizer, answer, case.key)]
    if not needle or not emit:
        raise RuntimeError(f"duo-heads: key {case.key} not found in the prompt or answer tokens")
    where.update(rows=torch.tensor(emit), cols=torch.tensor(needle))
    with torch.no_grad():
        model(torch.tensor([ids], device=next(model.parameters()).device))
    return torch.stack(mass)


def calibrate(model, tokenizer, lengths=(1024, 2048), depths=(0.2, 0.4, 0.6, 0.8), trials: int = 1,
              seed: int = CALIBRATION_SEED, progress: bool = True) -> torch.Tensor:
    """Retrieval score of every (layer, kv head), [n_layers, n_kv_heads] float32."""
    from slimfx.measure.passkey import build_cases

    cases = build_cases(tokenizer, lengths, depths, trials, seed)
    n_q, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    where: dict = {}
    with attention_weights(model, "duo-heads", lambda weights: _needle_mass(weights, where)) as mass:
        total = torch.zeros(len(mass), n_q)
        for i, case in enumerate(cases):
            total += _case_mass(model, tokenizer, mass, where, case)
            if progress:
                print(f"\rduo-heads: {i + 1}/{len(cases)} prompts", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    n_layers = len(mass)
    per_q_head = total / len(cases)
    return per_q_head.view(n_layers, n_kv, n_q // n_kv).mean(-1)


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1024,2048") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output .safetensors file (reference it under [artifacts] as duo_heads)")
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", default="1024,2048", help="synthetic passkey prompt lengths in tokens")
    p.add_argument("--depths", default="0.2,0.4,0.6,0.8", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="prompts per (length, depth)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="key seed (eval uses 0; keep them apart)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


def main(args: argparse.Namespace) -> int:
    from slimfx.runtime.models import load_model, resolve_model_source

    if not str(args.out).endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: expected a path ending in .safetensors")
    lengths = _int_list(args.lengths, "--lengths")
    try:
        depths = tuple(float(x) for x in args.depths.split(","))
    except ValueError:
        raise UsageError(f"--depths {args.depths!r}: expected comma-separated numbers in [0, 1]") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise UsageError(f"--depths {args.depths!r}: allowed: numbers in [0, 1]")
    start = time.time()
    model, tokenizer = load_model(args.model)
    scores = calibrate(model, tokenizer, lengths, depths, args.trials, args.seed, progress=not args.no_progress)
    meta = {"model": resolve_model_source(args.model).name, "lengths": list(lengths), "depths": list(depths), "trials": args.trials, "seed": args.seed,
            "method": "mean attention mass on the needle while emitting key digits, teacher-forced, GQA-group mean"}
    path = save(scores, args.out, meta)
    top = select_retrieval(scores, 0.25).nonzero().tolist()
    print(f"wrote {path}: retrieval scores for {scores.shape[0]} layers x {scores.shape[1]} kv heads "
          f"in {time.time() - start:.0f}s; top quarter (layer, head): {top}")
    return 0
