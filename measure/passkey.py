"""Passkey retrieval: a 5-digit key hidden at a chosen depth in filler text.

The prompt (one user turn through the chat template) is the classic one from the
Landmark-attention / LongLoRA evaluations: an instruction, repeated filler sentences
with the key sentence inserted at `depth`, and the question. The model decodes greedily
and a case counts as found when the key's five digits appear in its answer.
Every key comes from a seeded RNG keyed by (seed, length, depth, trial): the same
arguments always build the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from slimfx.measure.errors import UsageError
from slimfx.measure.lm import capacity_for
from slimfx.measure.runner import as_runner, greedy_generate
from slimfx.runtime.models import chat_input_ids

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"

DEFAULT_LENGTHS = (1024, 2048, 3072)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class PasskeyCase:
    """One prompt: target length (tokens), depth in [0, 1], trial index, key, token ids [1, T]."""

    length: int
    depth: float
    trial: int
    key: str
    input_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def _prompt(n_filler: int, depth: float, key: str) -> str:
    at = round(depth * n_filler)
    parts = [INTRO] + [FILLER] * at + [NEEDLE.format(key=key)] + [FILLER] * (n_filler - at) + [QUESTION]
    return " ".join(parts)


def _fit_filler(tokenizer, length: int) -> int:
    """Largest filler count whose prompt is at most `length` tokens (binary search on the
    real tokenization: the template and tokenizer merges make the count non-additive)."""
    probe = "12345"
    lo, hi = 0, 1
    while chat_input_ids(tokenizer, _prompt(hi, 0.5, probe)).shape[1] <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if chat_input_ids(tokenizer, _prompt(mid, 0.5, probe)).shape[1] <= length:
            lo = mid
        else:
            hi = mid
    return lo


def case_key(seed: int, length: int, depth: float, trial: int) -> str:
    return str(random.Random(f"passkey/{seed}/{length}/{depth:.4f}/{trial}").randint(10000, 99999))


def build_cases(tokenizer, lengths: Iterable[int] = DEFAULT_LENGTHS, depths: Iterable[float] = DEFAULT_DEPTHS,
                trials: int = 1, seed: int = 0) -> list[PasskeyCase]:
    """Prompts for every (length, depth, trial), lengths measured in chat-template tokens."""
    cases = []
    for length in lengths:
        n_filler = _fit_filler(tokenizer, length)
        if n_filler == 0:
            bare = chat_input_ids(tokenizer, _prompt(0, 0.5, "12345")).shape[1]
            raise UsageError(f"--lengths {length}: shorter than the passkey prompt with no filler ({bare} tokens); allowed: lengths above {bare}")
        for depth in depths:
            for trial in range(trials):
                key = case_key(seed, length, depth, trial)
                ids = chat_input_ids(tokenizer, _prompt(n_filler, depth, key))
                cases.append(PasskeyCase(int(length), float(depth), trial, key, ids))
    return cases


def run_cases(model, tokenizer, cases: list[PasskeyCase], max_new_tokens: int = 16,
              device: str | torch.device = "cpu", on_case: Callable[[], None] | None = None) -> list[dict]:
    """Greedy-decode every case with `model` (an HF causal LM or a Runner); one record per case: length, n_tokens, depth, trial, key,
    answer (decoded text), found (the key's digits appear in the answer) and
    kv_bytes (the bytes its KV cache or store held after the prompt, as allocated)."""
    model = as_runner(model)
    records = []
    # One cache capacity for every case: the compiled model then compiles one decode graph.
    capacity = capacity_for(max(c.n_tokens for c in cases) + max_new_tokens) if cases else None
    for case in cases:
        stats: dict = {}
        new = greedy_generate(model, case.input_ids.to(device), max_new_tokens, tokenizer.eos_token_id, stats, capacity)
        answer = tokenizer.decode(new, skip_special_tokens=True)
        record = {"length": case.length, "depth": case.depth, "trial": case.trial, "key": case.key, "n_tokens": case.n_tokens}
        record.update(answer=answer, found=case.key in answer.replace(" ", ""), **stats)
        records.append(record)
        if on_case is not None:
            on_case()
    return records


def summarize(records: list[dict]) -> dict:
    """Accuracy overall, per target length, per depth and per (length, depth).

    Returns {"accuracy": float, "by_length": {length: {"accuracy", "n", "mean_tokens"}},
    "by_depth": {depth: accuracy}, "grid": {length: {depth: accuracy}}}; keys are strings
    so the dict round-trips through JSON unchanged.
    """
    def acc(rs):
        return sum(r["found"] for r in rs) / len(rs) if rs else float("nan")

    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    by_length = {}
    for length in lengths:
        rs = [r for r in records if r["length"] == length]
        by_length[str(length)] = {"accuracy": acc(rs), "n": len(rs), "mean_tokens": sum(r["n_tokens"] for r in rs) / len(rs)}
    return {
        "accuracy": acc(records),
        "n": len(records),
        "by_length": by_length,
        "by_depth": {str(d): acc([r for r in records if r["depth"] == d]) for d in depths},
        "grid": {str(n): {str(d): acc([r for r in records if r["length"] == n and r["depth"] == d]) for d in depths} for n in lengths},
    }
