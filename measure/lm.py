"""Driving an HF-style causal LM token by token: the Stepper every metric's loop feeds
(runner.py's greedy_generate), so every metric sees the model exactly as decoding does
(prefill once, then one token per call through the model's KV cache).

The cache is an HF `StaticCache` with explicit `cache_position` / `position_ids` when
the model has a config: its shapes do not change from step to step, so a compiled model
compiles one decode graph and one prefill graph per prompt length. (With a
DynamicCache, dynamo recompiled on every decode step on torch 2.13 / transformers 5.23
and fell back to eager after 8: the "compiled" figures would have been the eager
model's.) Base and compiled models use the same cache kind, so identical models give
bit-identical logits.
"""

from __future__ import annotations

import torch

CAPACITY_STEP = 256  # static caches are sized in steps of this, so nearby prompts share a decode graph


def capacity_for(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class Stepper:
    """Feeds tokens to `model` and keeps its KV cache between calls.

    `feed(ids [B, T]) -> logits [B, T, V]` (float32). With `capacity` and a model that has
    a `.config`, the cache is a StaticCache of `capacity` tokens; otherwise the model's
    own returned cache (DynamicCache) is passed back, and a model that returns none is
    run on the whole sequence each call (slow but correct), so any callable returning
    `.logits` works.
    """

    def __init__(self, model, capacity: int | None = None):
        self.model = model
        self.pos = 0
        self.cache = None
        self.capacity = capacity
        self.seen: torch.Tensor | None = None  # every id fed so far, for the no-cache path
        self._mode = "dynamic"
        config = getattr(model, "config", None)
        if capacity is not None and config is not None:
            from transformers import StaticCache

            self.cache = StaticCache(config=config, max_cache_len=capacity)
            self._mode = "static"

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        if self._mode == "static":
            if self.pos + T > self.capacity:
                raise ValueError(f"Stepper: {self.pos + T} tokens exceed the cache capacity {self.capacity}")
            pos = torch.arange(self.pos, self.pos + T, device=ids.device)
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                             cache_position=pos, position_ids=pos[None].expand(B, T))
            self.pos += T
            return out.logits.float()
        self.seen = ids if self.seen is None else torch.cat([self.seen, ids], dim=1)
        if self._mode == "dynamic":
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
            cache = getattr(out, "past_key_values", None)
            if cache is None:
                self._mode = "recompute"  # the model keeps no cache: recompute from here on
            self.cache = cache
            return out.logits.float()
        out = self.model(input_ids=self.seen)
        return out.logits[:, -T:].float()


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of an HF cache object (DynamicCache, StaticCache, or a
    legacy tuple of (k, v) tuples); 0 for None."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    elif isinstance(cache, (tuple, list)):
        tensors = [t for pair in cache for t in pair]
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
