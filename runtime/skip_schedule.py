"""SkipDecode-style schedule: fewer blocks for later generated tokens, whole-batch, static.

    cfg: [passes.layer_skip] mode = "schedule", blocks = [...] (or plan / target_speedup),
         schedule_levels = L, schedule_tokens = T

Generated token i (0: the token after the prompt, from the full model's prefill) comes
from schedule level min(L - 1, i (L - 1) // T): level 0 is the whole model, level L - 1
removes every chosen block, level j the first ceil(j / (L - 1)) share of them in their
choice order (passes/layer_skip.level_share). The level depends on the generated index
only, so the whole batch shares it and it never decreases: a later token runs a subset
of the blocks an earlier token ran, so every block it runs holds the keys and values of
every earlier token and no cache entry is ever recomputed (SkipDecode's monotone exit).

Static shapes: one decode graph per level (the level-0 one is the generator's own), each
compiled once on first use and bound to the generator's store (runtime/skip_variants.py);
a position only selects which graph runs, so generation never recompiles. Lossy: the
tokens are those of this schedule, not of the whole model.
"""

from __future__ import annotations

import torch

from slimfx.runtime.generate import sample_next


def level_of(index: int, levels: int, tokens: int) -> int:
    """The schedule level of generated token `index` (module doc); nondecreasing in index."""
    return min(levels - 1, index * (levels - 1) // tokens)


class ScheduleLoop:
    """Decode steps through the level graphs; `step_fns[j]` runs level j."""

    def __init__(self, gen, step_fns: list, *, tokens: int, sampling: tuple, eos, pad_id: int, steps):
        self.gen, self.fns, self.tokens, self.sampling, self.eos, self.pad_id, self.steps = (
            gen, step_fns, tokens, sampling, eos, pad_id, steps)
        self.per_level = [0] * len(step_fns)

    def step(self, fn) -> None:
        gen = self.gen
        positions = gen.store.step_positions(1)
        positions.copy_(gen.store.seen[:, None])
        logits = fn(gen.model, gen.cur_tok, positions)
        gen._emit(sample_next(gen.hold_eos(logits, self.eos), *self.sampling), self.eos, self.pad_id)
        gen.store.seen.add_(1)

    def run(self, max_new: int, callback, interval: int) -> None:
        """Tokens 1..max_new - 1 (token 0 came from the prefill), streaming every `interval`."""
        streamed, done = 0, 1
        for index in range(1, max_new):
            level = level_of(index, len(self.fns), self.tokens)
            self.per_level[level] += 1
            fn = self.fns[level]
            self.steps.run(level, lambda: self.step(fn))
            done = index + 1
            if done % interval == 0:
                streamed = self._stream(callback, streamed, done)
                if self.eos is not None and bool(self.gen.finished.all()):
                    break
        self._stream(callback, streamed, done)

    def _stream(self, callback, streamed: int, done: int) -> int:
        if callback is not None and done > streamed:
            callback(self.gen.out[:, streamed:done].cpu(), streamed)
        return done
