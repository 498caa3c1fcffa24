"""Fidelity: how closely a compiled model's next-token distributions follow the
unmodified model's, teacher-forced over the same text.

Both models see the text the way decoding does: one prefill of the first `prefill`
tokens, then one token per call through their own KV caches (so a fixed-budget KV store
is exercised once the text outgrows it). They run in lockstep, so only one position's
logits per model are alive at a time.

Figures over the scored positions (each predicts the next token of the text):
top-1 agreement, mean KL(base || compiled) in nats, and the perplexity of each model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from slimfx.measure.errors import UsageError
from slimfx.measure.lm import capacity_for
from slimfx.measure.runner import as_runner, greedy_generate
from slimfx.runtime.models import chat_input_ids

# Fixed prompts for the default text: open-ended, so the model writes long answers.
DEFAULT_PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator works, step by step.",
    "Describe the history of the printing press and how it changed Europe.",
    "Give a detailed guide to planting and caring for a vegetable garden.",
)


@dataclass(frozen=True)
class Segment:
    """A token sequence ids [1, T]. The first `prefill` tokens go in one call; every
    later position is scored, predicted by a decode step from the tokens before it."""

    ids: torch.Tensor
    prefill: int

    @property
    def n_scored(self) -> int:
        return int(self.ids.shape[1]) - self.prefill


def default_segments(model, tokenizer, total_tokens: int = 1024, prompts=DEFAULT_PROMPTS,
                     device: str | torch.device = "cpu") -> list[Segment]:
    """The unmodified model's own greedy answers to fixed prompts (nothing to download).

    `total_tokens` generated tokens are split evenly over the prompts; the prompt is
    prefilled and the answer scored. Generation stops early at EOS.
    """
    per_prompt = max(1, total_tokens // len(prompts))
    segments = []
    for prompt in prompts:
        prompt_ids = chat_input_ids(tokenizer, prompt).to(device)
        new = greedy_generate(model, prompt_ids, per_prompt, tokenizer.eos_token_id).to(device)
        ids = torch.cat([prompt_ids, new[None]], dim=1)
        segments.append(Segment(ids, prefill=prompt_ids.shape[1]))
    return segments


def file_segments(path: str | Path, tokenizer, total_tokens: int = 1024, window: int = 1024,
                  prefill: int = 32, device: str | torch.device = "cpu") -> list[Segment]:
    """Segments of at most `window` tokens cut from a text file, `total_tokens` in all.

    Each segment prefills its first `prefill` tokens and scores every later position.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--text {path}: not UTF-8 text") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:total_tokens]
    if ids.numel() < 2:
        raise UsageError(f"--text {path}: fewer than 2 tokens; give a longer text")
    segments = []
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        if chunk.numel() >= 2:
            segments.append(Segment(chunk[None].to(device), prefill=max(1, min(prefill, chunk.numel() - 1))))
    return segments


def _positions(runner, seg: Segment, capacity: int) -> Iterator[torch.Tensor]:
    """Log-probs [1, V] (float64, so KL sums stay accurate at ~1e-12) predicting each
    scored position of seg in order, fed as decoding feeds: a prefill call, then one
    teacher-forced token per call."""
    stepper = runner.stepper(capacity)
    ids, T = seg.ids, seg.ids.shape[1]
    logits = stepper.feed(ids[:, :seg.prefill])[0, -1:]
    yield torch.log_softmax(logits.double(), dim=-1)
    for t in range(seg.prefill, T - 1):
        row = stepper.feed(ids[:, t:t + 1])[0, -1:]
        yield torch.log_softmax(row.double(), dim=-1)


class _Totals:
    def __init__(self):
        self.n = self.agree = 0
        self.kl = self.nll_base = self.nll_other = 0.0

    def add(self, lp: torch.Tensor, lq: torch.Tensor, targets: torch.Tensor) -> None:
        """lp, lq: log-probs [n, V] of base and compiled; targets: ids [n]."""
        self.n += targets.numel()
        self.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        # KL(p || q) = sum p (log p - log q); exactly 0 where the logits are identical.
        self.kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
        self.nll_base -= float(lp.gather(-1, targets[:, None]).sum())
        self.nll_other -= float(lq.gather(-1, targets[:, None]).sum())


def compare(base, other, segments: list[Segment], on_position: Callable[[int], None] | None = None) -> dict:
    """Teacher-force `base` and `other` (models or Runners) over `segments` in lockstep.

    Returns {"tokens": scored positions, "top1_agreement", "mean_kl" (nats),
    "ppl_base", "ppl_compiled"}.
    """
    base, other = as_runner(base), as_runner(other)
    totals = _Totals()
    capacity = capacity_for(max(int(s.ids.shape[1]) for s in segments)) if segments else 0
    for seg in segments:
        targets = seg.ids[0, seg.prefill:]
        done = 0
        for lp, lq in zip(_positions(base, seg, capacity), _positions(other, seg, capacity)):
            n = lp.shape[0]
            totals.add(lp, lq, targets[done:done + n])
            done += n
            if on_position is not None:
                on_position(n)
    if totals.n == 0:
        raise UsageError("fidelity: no scored tokens (the text is too short)")
    return {
        "tokens": totals.n,
        "top1_agreement": totals.agree / totals.n,
        "mean_kl": totals.kl / totals.n,
        "ppl_base": math.exp(totals.nll_base / totals.n),
        "ppl_compiled": math.exp(totals.nll_other / totals.n),
    }
