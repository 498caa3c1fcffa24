"""How `slimfx eval` runs a configuration: through the slimfx runtime, the way
`slimfx run` generates (the `kv_runtime` pass binds every attention site to a
fixed-capacity KVStore, so KV policies, budgets and sharing take effect), or, where
that runtime is absent, through `torch.compile(backend="slimfx")` with an HF cache.

Both expose the Stepper interface: `feed(ids [1, T]) -> logits [1, 1, V]` of the last
token (the runtime computes only the last position's logits), and `kv_bytes()`.
"""

from __future__ import annotations

import copy

import torch

from slimfx.measure.lm import Stepper, cache_bytes, capacity_for

# Prompts up to this many tokens are prefilled in one chunk, so a prefill-time eviction
# policy (SnapKV's observation window, H2O's accumulated mass) scores every prompt token
# with the whole prompt seen, as the papers do (with smaller chunks the store is
# compacted after each chunk, before the end of the prompt is seen).
PREFILL_CHUNK = 4096


def runtime_available() -> bool:
    try:
        from slimfx.runtime.generate import Generator  # noqa: F401
    except ImportError:
        return False
    return True


class RuntimeStepper:
    """Feeds tokens through a slimfx runtime Generator (one sequence).

    The first call prefills (the runtime left-pads to a bucket and runs chunks); every
    later call feeds one teacher-forced or greedy token at the next true position.
    """

    def __init__(self, model, capacity: int, config: dict):
        # The runtime left-pads a prompt to its bucket (up to one chunk more) and the
        # pads take slots, so the store gets that much room beyond the real tokens.
        # Powers of two, so prompts of nearby lengths share one Generator (one compile).
        self.model, self.config = model, config
        self.capacity = 1 << (capacity_for(capacity + PREFILL_CHUNK) - 1).bit_length()
        self.gen = None  # built at the first feed, when the prompt length is known

    def _build(self, prompt_tokens: int) -> None:
        from slimfx.passes.kv_eviction import resolve_prompt_fraction
        from slimfx.runtime.generate import get_generator

        # FX code, not inductor: eval measures quality, and an inductor compile per
        # configuration and capacity would dominate a sweep's time on a GPU.
        config = resolve_prompt_fraction(self.config, prompt_tokens)
        self.gen = get_generator(self.model, 1, self.capacity, config=config, codegen="eager")
        self.gen.store.reset()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gen is None:
            self._build(ids.shape[1])
            lengths = torch.tensor([ids.shape[1]], dtype=torch.int64)
            return self.gen.prefill(ids, lengths, PREFILL_CHUNK)[:, None].float()
        gen, store = self.gen, self.gen.store
        if ids.shape[1] != 1:
            raise ValueError("RuntimeStepper: after the prefill, feed one token per call")
        positions = store.step_positions(1)
        positions.copy_(store.seen[:, None])
        logits = gen.step_fn(gen.model, ids.to(store.device), positions)
        store.seen.add_(1)
        return logits[:, None].float()

    def kv_bytes(self) -> int:
        return self.gen.store.nbytes() if self.gen is not None else 0


class CompiledStepper(Stepper):
    """A Stepper over `torch.compile(model, backend="slimfx")` with an HF StaticCache."""

    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)


class BaseStepper(Stepper):
    """The unmodified model, returning only the last position's logits like the runtime."""

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return super().feed(ids)[:, -1:]

    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)


class Runner:
    """Makes steppers for one model under one configuration (or none: the unmodified model)."""

    def __init__(self, model, config: dict | None = None, mode: str = "runtime"):
        self.model, self.config, self.mode = model, config, mode
        if config is not None and mode == "runtime":
            # A copy, so a pass that rewrites weights never touches the unmodified model.
            self.model = copy.deepcopy(model)
        if config is not None and mode == "compile":
            from slimfx.measure.eval_run import compile_config

            self.compiled = compile_config(model, config)

    @property
    def label(self) -> str:
        if self.config is None:
            return "unmodified (HF eager, StaticCache)"
        return {"runtime": "slimfx.runtime.generate Generator (kv_runtime store)",
                "compile": "torch.compile(backend='slimfx') + HF StaticCache"}[self.mode]

    def stepper(self, capacity: int):
        if self.config is None:
            return BaseStepper(self.model, capacity)
        if self.mode == "runtime":
            return RuntimeStepper(self.model, capacity, self.config)
        return CompiledStepper(self.compiled, capacity)
