"""HF `generate(...)` for a model compiled with the slimfx backend, run by slimfx's runtime.

    model = torch.compile(model, backend="slimfx", options={"config": CFG})
    out = model.generate(**inputs, max_new_tokens=64)           # HF's API, slimfx's loop

Design: when a model was compiled with the slimfx backend, its `generate` goes to
`slimfx.runtime.generate`, the loop that binds every attention site to slimfx's KV store,
so every configured pass applies (KV eviction, KV quantization, weight quantization...)
and the tokens are those of `slimfx.runtime.generate(model, ids, config=CFG)`. HF's own
loop cannot give that: its graphs carry HF's DynamicCache, where the KV passes have
nothing to act on. compiler/generate_hook.py decides when a call is routed here; this
file turns HF's arguments into the runtime's and its result into HF's.

HF semantics kept: the model's `generation_config` under the call's arguments (HF's own
merge), greedy unless `do_sample` (then temperature, top_k, top_p), eos_token_id (one or
a list) and pad_token_id (defaulting to the first EOS), max_new_tokens / max_length,
min_new_tokens / min_length (EOS held back on device), left-padded `attention_mask`
(inferred from pad tokens as HF does when absent), num_return_sequences when sampling,
streamer (put(prompt), one put per step, end()), return_dict_in_generate (`.sequences`).
The output is prompt + new tokens; a sequence finished at EOS is padded with
pad_token_id, and the output stops where HF's loop would (every sequence finished).
Settings about how HF caches and compiles (use_cache, cache_implementation, ...) are
replaced by the runtime's KV store and compiled steps; they do not change the tokens.
Anything else slimfx cannot honour (beam search, output_scores, logits processors,
repetition penalty, ...) raises a UsageError naming it, never ignored.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from slimfx.compiler.errors import UsageError

# GenerationConfig fields the runtime honours (see the module docstring).
_HONOURED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
             "top_p", "num_return_sequences", "pad_token_id", "bos_token_id", "eos_token_id", "return_dict_in_generate"}
# How HF caches and compiles: the runtime's KV store and compiled steps take their place.
_REPLACED = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "prefill_chunk_size", "low_memory"}
# HF reads these only when sampling.
_SAMPLING_ONLY = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
_BOOKKEEPING = {"transformers_version", "_from_model_config", "decoder_start_token_id"}
_HF_DEFAULT_NEW_TOKENS = 20  # HF's max_length default when nothing sets a length

_LAST_STATS: dict = {}


def last_generate_stats() -> dict:
    """The runtime's stats of the last routed generate (kv_bytes, prefill_s, decode_s, ...)."""
    return dict(_LAST_STATS)


def generate(model, config, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
             prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None,
             negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None, **kwargs):
    """HF `model.generate(...)` (same arguments, same positions) through slimfx.runtime.generate
    with slimfx configuration `config`. Returns sequences [B, T + n] (prompt + new tokens) on
    the prompt's device, or GenerateDecoderOnlyOutput(sequences=...) when return_dict_in_generate."""
    _refuse_set({"logits_processor": logits_processor, "stopping_criteria": stopping_criteria,
                 "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn, "synced_gpus": synced_gpus,
                 "assistant_model": assistant_model, "negative_prompt_ids": negative_prompt_ids,
                 "negative_prompt_attention_mask": negative_prompt_attention_mask, "custom_generate": custom_generate})
    request = _request(model, inputs, generation_config, kwargs)
    if streamer is not None:
        streamer.put(request.ids.cpu())
    tokens = _run(model, config, request, streamer)
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([request.ids, tokens[:, :_steps_taken(tokens, request.eos)].to(request.ids.device)], dim=1)
    return _output(sequences, request.gen_config)


class _Request(NamedTuple):
    """One generate call in the runtime's terms."""

    gen_config: object  # HF's GenerationConfig after HF's own merge
    ids: torch.Tensor  # [B, T] (B already times num_return_sequences)
    mask: torch.Tensor | None
    eos: list[int]
    pad: int | None
    max_new: int
    min_new: int


def _request(model, inputs, generation_config, kwargs: dict) -> _Request:
    default_max_length = _length_unset(model, generation_config, kwargs, "max_length")
    default_min_length = _length_unset(model, generation_config, kwargs, "min_length")
    gen_config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _refuse_settings(gen_config)
    ids, mask = _prompt(inputs, model_kwargs)
    eos = _as_list(gen_config.eos_token_id)
    pad = gen_config.pad_token_id if gen_config.pad_token_id is not None else (eos[0] if eos else None)
    mask = mask if mask is not None else _inferred_mask(ids, pad, eos)
    ids, mask = _expanded(ids, mask, gen_config)
    T = ids.shape[1]
    return _Request(gen_config, ids, mask, eos, pad, _max_new_tokens(model, gen_config, T, default_max_length),
                    _min_new_tokens(gen_config, T, default_min_length))


def _run(model, config, request: _Request, streamer) -> torch.Tensor:
    """The runtime's new tokens [B, max_new] (CPU); its stats become last_generate_stats()."""
    from slimfx.runtime.generate import generate as run

    feed = _StreamerFeed(streamer, request.eos, request.ids.shape[0]) if streamer is not None else None
    tokens, stats = run(model, request.ids, attention_mask=request.mask, max_new_tokens=request.max_new,
                        min_new_tokens=request.min_new, **_sampling(request.gen_config),
                        eos_token_id=request.eos or None, pad_token_id=0 if request.pad is None else request.pad,
                        callback=feed, stream_interval=1 if feed is not None else 16, config=config)
    _LAST_STATS.clear()
    _LAST_STATS.update(stats)
    return tokens


def _refuse(name: str, value, allowed: str) -> UsageError:
    shown = type(value).__name__ if callable(value) or isinstance(value, (torch.nn.Module, torch.Tensor)) else repr(value)
    return UsageError(f"generate: {name}={shown} is not supported by slimfx's runtime (the model was compiled "
                      f"with backend='slimfx'); allowed: {allowed}")


def _refuse_set(arguments: dict) -> None:
    for name, value in arguments.items():
        empty = value is None or value is False or (isinstance(value, (list, tuple)) and not value)
        if not empty:
            raise _refuse(name, value, "None")


def _refuse_settings(gen_config) -> None:
    """Every GenerationConfig field the runtime does not honour must be at HF's default."""
    defaults = gen_config._get_default_generation_params()
    sampling = bool(gen_config.do_sample)
    for name, value in gen_config.to_dict().items():
        if name in _HONOURED | _REPLACED | _BOOKKEEPING or (name in _SAMPLING_ONLY and not sampling):
            continue
        if value is None or value is False or value == defaults.get(name):
            continue
        allowed = f"{defaults[name]!r} (HF's default)" if defaults.get(name) is not None else "unset"
        raise _refuse(name, value, allowed)
    if gen_config.num_return_sequences not in (None, 1) and not sampling:
        raise _refuse("num_return_sequences", gen_config.num_return_sequences, "1 without do_sample=True")
    if sampling and not (gen_config.temperature or 0) > 0:
        raise _refuse("temperature", gen_config.temperature, "a number > 0 with do_sample=True")


def _length_unset(model, generation_config, kwargs: dict, name: str) -> bool:
    """HF's test for a length nobody set (then HF applies its own default)."""
    return (kwargs.get(name) is None and (generation_config is None or getattr(generation_config, name) is None)
            and getattr(model.generation_config, name) is None)


def _prompt(inputs, model_kwargs: dict):
    ids = model_kwargs.pop("input_ids", None)
    if inputs is not None and ids is not None:
        raise UsageError("generate: both inputs and input_ids given; allowed: one of them")
    ids = inputs if inputs is not None else ids
    if ids is None:
        raise UsageError("generate: input_ids: missing; allowed: a [batch, tokens] tensor of token ids")
    mask = model_kwargs.pop("attention_mask", None)
    for name, value in model_kwargs.items():
        if value is not None:
            raise _refuse(name, value, "input_ids, attention_mask and generation settings")
    return ids, mask


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.flatten()]
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


def _inferred_mask(ids: torch.Tensor, pad: int | None, eos: list[int]) -> torch.Tensor | None:
    """HF's rule: pad tokens in the prompt are padding, unless the pad token is also an EOS."""
    if pad is None or pad in eos or not bool((ids == pad).any()):
        return None
    return (ids != pad).long()


def _expanded(ids, mask, gen_config):
    n = gen_config.num_return_sequences or 1
    if n == 1:
        return ids, mask
    return ids.repeat_interleave(n, dim=0), None if mask is None else mask.repeat_interleave(n, dim=0)


def _max_new_tokens(model, gen_config, T: int, default_max_length: bool) -> int:
    """HF's order: max_new_tokens, else max_length (the total), else 20 new tokens within
    the model's position range."""
    if gen_config.max_new_tokens is not None:
        return gen_config.max_new_tokens
    if default_max_length:
        total = T + _HF_DEFAULT_NEW_TOKENS
        limit = getattr(model.config, "max_position_embeddings", None)
        return (min(total, limit) if limit else total) - T
    if gen_config.max_length <= T:
        raise _refuse("max_length", gen_config.max_length, f"more than the prompt's {T} tokens, or max_new_tokens")
    return gen_config.max_length - T


def _min_new_tokens(gen_config, T: int, default_min_length: bool) -> int:
    if gen_config.min_new_tokens is not None:
        return gen_config.min_new_tokens
    return 0 if default_min_length else max(0, (gen_config.min_length or 0) - T)


def _sampling(gen_config) -> dict:
    """Greedy unless do_sample, whatever temperature says (HF's rule)."""
    if not gen_config.do_sample:
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    return {"temperature": float(gen_config.temperature), "top_k": int(gen_config.top_k or 0),
            "top_p": float(1.0 if gen_config.top_p is None else gen_config.top_p)}


def _steps_taken(tokens: torch.Tensor, eos: list[int]) -> int:
    """The steps HF's loop runs: all of them, unless every sequence has produced an EOS;
    then up to the last of those first EOS tokens."""
    if not eos:
        return tokens.shape[1]
    hit = torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype))
    if not bool(hit.any(dim=1).all()):
        return tokens.shape[1]
    return int(hit.int().argmax(dim=1).max()) + 1


class _StreamerFeed:
    """The runtime's callback (tokens [B, k], first index) as HF streamer calls: one put()
    per step with that step's tokens [B]; none once every sequence has finished."""

    def __init__(self, streamer, eos: list[int], batch: int):
        self.streamer = streamer
        self.eos = torch.tensor(eos, dtype=torch.int64)
        self.finished = torch.zeros(batch, dtype=torch.bool)

    def __call__(self, tokens: torch.Tensor, first: int) -> None:
        for step in tokens.unbind(dim=1):
            if bool(self.finished.all()):
                return
            self.streamer.put(step)
            self.finished |= torch.isin(step, self.eos)


def _output(sequences: torch.Tensor, gen_config):
    if not gen_config.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences)
