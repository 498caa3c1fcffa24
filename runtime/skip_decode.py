"""The generation loop of layer_skip's runtime modes: slimfx.runtime.generate hands a config
whose layer_skip runs in mode "speculative" (runtime/speculative.py, lossless) or
"schedule" (runtime/skip_schedule.py, SkipDecode) to `generate_skipping`.

Both prefill with the whole model (the generator of the config without layer_skip), then
decode through extra graphs of the same model bound to the same store
(runtime/skip_variants.py). On CUDA every kind of step (a draft step, a verification, a
schedule level) is captured in its own CUDA graph after two eager warm-up runs.
"""

from __future__ import annotations

import time

import torch

from slimfx.compiler.errors import user_errors
from slimfx.runtime.generate import (GenerateOutput, begin_generation, eos_tensor, get_generator,
                                     padded_prompt_length, prompt_lengths, sample_next, sync_device, use_cuda_graph)
from slimfx.runtime.kv_store import KVStoreError
from slimfx.runtime.skip_schedule import ScheduleLoop
from slimfx.runtime.skip_variants import full_config, removing_config, skip_mode, variants_of
from slimfx.runtime.speculative import SpeculativeLoop

__all__ = ["generate_skipping", "skip_mode"]


class StepGraphs:
    """Runs device-only steps by key: eagerly for the first WARM calls of a key (on a side
    stream when graphs are on, as torch.cuda.graphs asks), then from a CUDA graph captured
    on the next call and replayed from then on (capture records without running, so the
    capturing call replays once)."""

    WARM = 2

    def __init__(self, use_graph: bool):
        self.use_graph = use_graph
        self.calls: dict = {}
        self.graphs: dict = {}

    def run(self, key, step) -> bool:
        """Run `step` once; True when it ran warm (replayed; without graphs: after its WARM
        first calls, which compile)."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return True
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        if not self.use_graph:
            step()
            return calls > self.WARM
        if calls <= self.WARM:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            return False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        self.graphs[key] = graph
        graph.replay()
        return False


def _check_rollback(store, needed: int) -> None:
    """KVStoreError naming why a rollback on `store` would not be exact."""
    why = store.rollback_refusal()
    if why:
        raise KVStoreError(f"layer_skip mode 'speculative': {why}; allowed: no kv_eviction or kv_quantize "
                           "(a rollback must restore the store exactly)")
    if store.windows:
        raise KVStoreError(f"layer_skip mode 'speculative': sites {sorted(store.windows)} are sliding-window rings; "
                           "allowed: models without sliding-window layers (a ring would lose in-window tokens to the drafts)")
    small = {i: c.capacity for i, c in store.owned_sites() if c.capacity < needed}
    if small:
        raise KVStoreError(f"layer_skip mode 'speculative': sites {sorted(small)} hold {min(small.values())} slots; allowed: "
                           f"at least {needed} (prompt + new tokens + draft_length: a verification writes past the kept tokens)")


def generate_skipping(model, input_ids, *, max_new_tokens: int, min_new_tokens: int, attention_mask, capacity, capacities,
                      sampling: tuple, eos_token_id, pad_token_id: int, prefill_chunk: int, callback, stream_interval: int,
                      cuda_graph, seed, config, codegen: str) -> GenerateOutput:
    """slimfx.runtime.generate for a config running layer_skip in mode speculative or schedule
    (arguments checked by the caller). Stats as the plain loop's plus, speculative: rounds,
    drafted, accepted, acceptance_rate, draft_lengths {k: rounds}, tokens_per_round,
    draft_cost, and ms_per_round / ms_per_token over the rounds that ran warm (timed_rounds:
    no compile, warm-up or graph capture in them); schedule: tokens_per_level."""
    from slimfx.compiler.pipeline import specialise

    mode, opts = skip_mode(config)
    lengths = prompt_lengths(input_ids, attention_mask)
    B, T = input_ids.shape
    extra = opts["draft_length"] if mode == "speculative" else 0
    needed = int(lengths.max()) + max_new_tokens + extra
    if capacity is None:
        capacity = -(-(padded_prompt_length(T, prefill_chunk) + max_new_tokens + extra) // 256) * 256
    elif mode == "speculative" and capacity < needed:  # a verification writes draft_length past the kept tokens
        from slimfx.compiler.config import ConfigError  # the plain loop's capacity refusal (generate.check_capacity)

        raise ConfigError(f"capacity {capacity}: self-speculative decoding writes {needed} KV slots per attention site "
                          f"(longest prompt {int(lengths.max())} + max_new_tokens {max_new_tokens} + draft_length "
                          f"{extra}); allowed: at least {needed} (rolling a wrapped ring back is not exact)")
    if seed is not None:
        torch.manual_seed(seed)
    config = specialise(config, int(lengths.max()))
    gen = get_generator(model, B, capacity, capacities=capacities, config=full_config(config), codegen=codegen)
    device = gen.store.device
    use_graph = use_cuda_graph(device, cuda_graph)
    eos = eos_tensor(eos_token_id, device)
    variants, steps = variants_of(gen), StepGraphs(use_graph)
    with torch.inference_mode(), user_errors():
        begin_generation(gen, B, max_new_tokens, min_new_tokens, pad_token_id)
        sync_device(device)
        t0 = time.perf_counter()
        logits = gen.prefill(input_ids, lengths, prefill_chunk)
        if mode == "speculative":
            _check_rollback(gen.store, needed)
            draft_config = removing_config(config)
            draft = variants.get("draft", draft_config)
            verify = variants.get("verify", full_config(config), all_logits=True)
            loop = SpeculativeLoop(gen, draft, verify, longest=opts["draft_length"], adaptive=opts["adaptive_draft"],
                                   sampling=sampling, eos=eos, pad_id=pad_token_id, max_new=max_new_tokens,
                                   min_new=min_new_tokens, vocab=logits.shape[-1], steps=steps,
                                   cost=lambda: variants.kept_fraction("draft", draft_config))
            loop.emit_first(logits)
        else:
            gen._emit(sample_next(gen.hold_eos(logits, eos), *sampling), eos, pad_token_id)
            levels = opts["schedule_levels"]
            fns = [gen.step_fn] + [variants.get("level", removing_config(config, j)) for j in range(1, levels)]
            loop = ScheduleLoop(gen, fns, tokens=opts["schedule_tokens"], sampling=sampling, eos=eos, pad_id=pad_token_id,
                                steps=steps)
        sync_device(device)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        if mode == "speculative":
            stats = loop.run(callback)
            tokens = loop.tokens(pad_token_id)
            stats.update(tokens_per_round=(max_new_tokens - 1) / max(1, stats["rounds"]),
                         draft_cost=variants.kept_fraction("draft", draft_config))
        else:
            loop.run(max_new_tokens, callback, stream_interval)
            tokens, stats = gen.out.cpu(), {"tokens_per_level": loop.per_level}
        sync_device(device)
        decode_s = time.perf_counter() - t1
    stats.setdefault("ms_per_token", 1e3 * decode_s / max(1, max_new_tokens - 1))
    # The plain loop's keys, so callers timing it (slimfx bench) read these loops alike.
    stats.update(ms_per_step=stats["ms_per_token"], warmup_s=0.0, decode_steps=max_new_tokens - 1)
    stats.update(mode=mode, prefill_s=t_prefill, decode_s=decode_s,
                 tokens_per_s=B * (max_new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
                 kv_bytes=gen.store.nbytes(), cuda_graph=use_graph, new_tokens=max_new_tokens, batch=B, codegen=gen.codegen)
    return GenerateOutput(tokens, stats)
