"""How `slimfx eval` runs a configuration: through the slimfx runtime, the way
`slimfx run` generates (the `kv_runtime` pass binds every attention site to a
fixed-capacity KVStore, so KV policies, budgets and sharing take effect), or, where
that runtime is absent, through `torch.compile(backend="slimfx")` with an HF cache.

Both expose the Stepper interface: `feed(ids [1, T]) -> logits [1, 1, V]` of the last
token (the runtime computes only the last position's logits), and `kv_bytes()`.
`greedy_generate` is the loop passkey, fidelity and the default-text generator share,
over a Runner or a plain model.
"""

from __future__ import annotations

import copy

import torch

from slimfx.measure.lm import Stepper, cache_bytes, capacity_for

# Prompts up to this many tokens are prefilled in one chunk (a pass may ask for another:
# kv_eviction's `prefill_chunk`, through compiler/pipeline.py).
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
        self.model, self.config, self.wanted = model, config, capacity
        self.gen = None  # built at the first feed, when the prompt length is known

    def _build(self, prompt_tokens: int) -> None:
        from slimfx.compiler.pipeline import prefill_chunk, specialise
        from slimfx.runtime.generate import get_generator
        from slimfx.runtime.skip_variants import full_config, removing_config, variants_of

        # FX code, not inductor: eval measures quality, and an inductor compile per
        # configuration and capacity would dominate a sweep's time on a GPU.
        config = specialise(self.config, prompt_tokens)
        self.chunk = prefill_chunk(config, prompt_tokens, PREFILL_CHUNK)
        self.capacity = 1 << (capacity_for(self.wanted + self.chunk) - 1).bit_length()
        schedule = _schedule_options(config)
        graph_config = config if schedule is None else full_config(config)
        self.gen = get_generator(self.model, 1, self.capacity, config=graph_config, codegen="eager")
        self.gen.store.reset()
        self.step_fns, self.generated = [self.gen.step_fn], 0
        self.level = lambda index: 0
        if schedule is not None:  # a SkipDecode schedule: one graph per level, as generate runs it
            from slimfx.runtime.skip_schedule import level_of

            variants = variants_of(self.gen)
            levels, tokens = schedule["schedule_levels"], schedule["schedule_tokens"]
            self.step_fns += [variants.get("level", removing_config(config, j)) for j in range(1, levels)]
            self.level = lambda index: level_of(index, levels, tokens)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gen is None:
            self._build(ids.shape[1])
            lengths = torch.tensor([ids.shape[1]], dtype=torch.int64)
            return self.gen.prefill(ids, lengths, self.chunk)[:, None].float()
        gen, store = self.gen, self.gen.store
        if ids.shape[1] != 1:
            raise ValueError("RuntimeStepper: after the prefill, feed one token per call")
        positions = store.step_positions(1)
        positions.copy_(store.seen[:, None])
        self.generated += 1  # this step's logits give generated token `generated` (token 0 came from the prefill)
        logits = self.step_fns[self.level(self.generated)](gen.model, ids.to(store.device), positions)
        store.seen.add_(1)
        return logits[:, None].float()

    def kv_bytes(self) -> int:
        return self.gen.store.nbytes() if self.gen is not None else 0


def _schedule_options(config) -> dict | None:
    """layer_skip's options when `config` runs a SkipDecode schedule, else None."""
    from slimfx.runtime.skip_variants import skip_mode

    mode = skip_mode(config)
    return mode[1] if mode is not None and mode[0] == "schedule" else None


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


def compile_config(model, raw_config: dict):
    """A fresh copy of `model` compiled by slimfx with `raw_config` (the copy keeps a
    pass that rewrites weights from touching the unmodified model)."""
    return torch.compile(copy.deepcopy(model), backend="slimfx", options={"config": raw_config})


class Runner:
    """Makes steppers for one model under one configuration (or none: the unmodified model)."""

    def __init__(self, model, config: dict | None = None, mode: str = "runtime"):
        self.model, self.config, self.mode = model, config, mode
        if config is not None and mode == "runtime":
            # A copy, so a pass that rewrites weights never touches the unmodified model.
            self.model = copy.deepcopy(model)
        if config is not None and mode == "compile":
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


def as_runner(model_or_runner):
    """A Runner (anything with `.stepper(capacity)`) as is; a plain model becomes the
    unmodified-model Runner (HF eager with a StaticCache)."""
    if hasattr(model_or_runner, "stepper"):
        return model_or_runner
    return Runner(model_or_runner)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                    stats: dict | None = None, capacity: int | None = None) -> torch.Tensor:
    """Greedy continuation of `input_ids` [1, T] by a model or Runner; returns the new ids
    [n] (n <= max_new_tokens, stopping after EOS). `capacity` sizes the KV cache (default:
    T + max_new_tokens rounded up). `stats`, when given, receives `kv_bytes`: what the
    cache or KV store held after the prompt (allocated bytes)."""
    stepper = as_runner(model).stepper(capacity or capacity_for(input_ids.shape[1] + max_new_tokens))
    logits = stepper.feed(input_ids)
    if stats is not None:
        stats["kv_bytes"] = stepper.kv_bytes()
    new: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new.append(token)
        if (eos_token_id is not None and token == eos_token_id) or step == max_new_tokens - 1:
            break
        logits = stepper.feed(torch.tensor([[token]], device=input_ids.device))
    return torch.tensor(new, dtype=torch.long)
