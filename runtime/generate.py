"""The fast generation loop (gpt-fast style) over a model compiled with the slimfx backend.

    from slimfx.runtime import generate
    tokens, stats = generate(model, input_ids, attention_mask=mask, max_new_tokens=128)

How it works, and why:
- The HF model is called with `use_cache=False` and explicit true `position_ids`, so
  each captured graph holds only this step's k/v flowing into SDPA; the `kv_runtime`
  pass replaces every SDPA with `slimfx::attention` bound to a `KVStore`
  (runtime/kv_store.py). The model itself stays an unmodified HF module.
- Shapes are static: prompts are left-padded to a bucket (a power of two up to
  `prefill_chunk`, then a multiple of it) and prefilled chunk by chunk, so a handful
  of prefill graphs and exactly one decode graph are compiled (`dynamic=False`).
- Decode steps touch only device tensors: the next position is the store's per-
  sequence `seen` counter, sampling is torch ops on device (Gumbel/exponential trick,
  no `multinomial` sync), tokens are written into a device output buffer at a device
  step index. On CUDA the step is captured in a CUDA graph after two warm-up steps and
  replayed; the host reads results only every `stream_interval` steps (streaming
  callback, EOS check) and at the end.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import time
import types
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch

from slimfx.compiler.errors import user_errors
from slimfx.runtime.exactness import site_windows
from slimfx.runtime.kv_store import KVStore


class GenerateError(ValueError):
    """Bad arguments to generate(); one line naming the argument and what is allowed."""


class GenerateOutput(NamedTuple):
    """tokens: [B, max_new_tokens] int64 on CPU (after EOS: pad_token_id).
    stats: prefill_s, warmup_s (first decode steps incl. compile and graph capture),
    decode_s (the remaining steps), decode_steps (timed), ms_per_step, tokens_per_s
    (batch * timed steps / decode_s), kv_bytes (store memory), cuda_graph, new_tokens."""

    tokens: torch.Tensor
    stats: dict


# ----------------------------------------------------------------------------- sampling


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], on device without host synchronisation.

    temperature 0 is greedy (argmax). Otherwise logits / temperature, restricted to the
    top_k largest (0 = all) and to the smallest set whose probability reaches top_p,
    sampled by argmax(p / E) with E ~ Exp(1) (equivalent to a categorical draw; no sync).
    """
    if temperature == 0.0:
        return argmax_last(logits)
    return draw(sampling_probs(logits, temperature, top_k, top_p))


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sample_next draws from (temperature > 0), [..., V] float32."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [..., V]: argmax(p / E), E ~ Exp(1) (a categorical draw, no sync)."""
    noise = torch.empty_like(probs).exponential_(1.0)
    return argmax_last(probs / noise)


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (first index on ties) in two parallel stages for long rows.

    Why: torch's argmax over one row runs in a single thread block; over Llama-3's 128K
    vocabulary it took 38 us of a 1.43 ms decode step on an H100 (profile in the README).
    Here each of G groups of the row is reduced by its own block, then the G maxima:
    torch.max(dim) returns the first maximal index in each group, and argmax over the
    group maxima the first group holding the maximum, so ties resolve as argmax does.
    On CPU torch's argmax is the faster (SmolLM2's 49K vocabulary, 2 cores: 205 against
    339 us with one thread, 284 against 4311 us with two on a loaded machine).
    """
    v = x.shape[-1]
    groups = _argmax_groups(v) if x.is_cuda else 1
    if groups == 1:
        return x.argmax(dim=-1)
    values, index = x.unflatten(-1, (groups, v // groups)).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (best * (v // groups) + index.gather(-1, best)).squeeze(-1)


@functools.lru_cache(maxsize=None)
def _argmax_groups(v: int) -> int:
    """The most groups (up to 256) of at least 256 elements that divide v evenly; 1 if none."""
    for groups in range(min(256, v // 256), 1, -1):
        if v % groups == 0:
            return groups
    return 1


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise GenerateError(f"temperature: got {temperature!r}; allowed: a finite number >= 0 (0 = greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerateError(f"top_k: got {top_k!r}; allowed: an integer >= 0 (0 = no top-k)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerateError(f"top_p: got {top_p!r}; allowed: a number in (0, 1]")


# ----------------------------------------------------------------------------- prompts


def padded_prompt_length(length: int, chunk: int) -> int:
    """Padded prompt length: a power of two (>= 16) up to `chunk`, then a multiple of `chunk`."""
    if length <= chunk:
        return min(chunk, max(16, 1 << (length - 1).bit_length()))
    return -(-length // chunk) * chunk


def prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerateError(f"input_ids: got {got}; allowed: an integer tensor [batch, tokens]")
    B, T = input_ids.shape
    if T == 0:
        raise GenerateError("input_ids: empty prompt; allowed: at least one token per sequence")
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.int64)
    if tuple(attention_mask.shape) != (B, T):
        raise GenerateError(f"attention_mask: got shape {tuple(attention_mask.shape)}; allowed: the shape of input_ids {(B, T)}")
    mask = attention_mask.detach().to("cpu", torch.int64)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise GenerateError("attention_mask: allowed values are 0 and 1")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise GenerateError("attention_mask: padding must be on the left (tokenizer.padding_side = 'left')")
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise GenerateError("attention_mask: a sequence has no tokens; allowed: at least one per sequence")
    return lengths


# ----------------------------------------------------------------------------- the generator


def _model_step(model, input_ids, position_ids):
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


_STEP_IDS = itertools.count()


def _fresh_step_function() -> Callable:
    """A copy of _model_step with its own code object. Dynamo caches compiled graphs per
    code object (and caps entries per code object), so each Generator, bound to its own
    store, gets its own cache instead of competing for one."""
    code = _model_step.__code__.replace(co_name=f"_slimfx_step_{next(_STEP_IDS)}")
    return types.FunctionType(code, _model_step.__globals__)


def _runtime_config(config, store_id: str):
    """`config` with kv_runtime bound to the store, as a Config that keeps the source it
    came from (the compile reports name the user's file, not "<dict>")."""
    from slimfx.compiler.config import load_config, validate_config
    from slimfx.compiler.pipeline import with_pass

    loaded = load_config(config)
    raw = loaded.to_dict()
    # The pass pipeline runs with FX code generation; the generator lowers afterwards
    # (runtime/lowering.py), because store buffers must become graph inputs first.
    raw["compile"]["codegen"] = "eager"
    pipeline = with_pass([p for p in raw["pipelines"][raw["compile"]["pipeline"]] if p != "kv_runtime"], "kv_runtime")
    raw["pipelines"]["_slimfx_runtime"] = pipeline
    raw["compile"]["pipeline"] = "_slimfx_runtime"
    raw["passes"]["kv_runtime"] = {"store": store_id}
    return validate_config(raw, loaded.source)


def _resolve_codegen(codegen: str, config, is_cuda: bool) -> str:
    """The argument when explicit, else the config's `compile.codegen` when explicit, else
    inductor on CUDA (fuses the non-attention ops; measured in benchmarks/bench_runtime.py)
    and FX code on CPU (exact, no C++ build per shape)."""
    if codegen == "auto" and config is not None:
        from slimfx.compiler.config import load_config

        codegen = load_config(config).compile["codegen"]
    if codegen == "auto":
        return "inductor" if is_cuda else "eager"
    return codegen


class Generator:
    """A model bound to one KVStore (batch, capacity) with its compiled step function.
    Reused across generate() calls of the same shape: the store is reset in place."""

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int, *, capacities: dict | None = None, config=None,
                 codegen: str = "auto", on_graph=None):
        param = next(model.parameters())
        self.model = model
        self.store = KVStore(batch, capacity, dtype=param.dtype, device=param.device, capacities=capacities,
                             windows=site_windows(model))
        from slimfx.runtime.lowering import runtime_backend

        from slimfx.compiler.config import load_config

        loaded = load_config(config)  # once: a file is read and validated a single time
        self.codegen = _resolve_codegen(codegen, loaded if config is not None else None, param.is_cuda)
        backend = runtime_backend(_runtime_config(loaded, self.store.id), self.codegen, on_graph)
        self.step_fn = torch.compile(_fresh_step_function(), backend=backend, dynamic=False, fullgraph=True)
        dev = param.device
        self.cur_tok = torch.zeros(batch, 1, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.int64, device=dev)
        self.out: torch.Tensor | None = None
        self.min_new_tokens = 0  # set per generate() call

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, chunk: int) -> torch.Tensor:
        """Run the (left-padded) prompts through the model chunk by chunk; logits [B, V] of the last token."""
        B, T = input_ids.shape
        dev = self.store.device
        padded_len = self.padded_length(T, chunk)
        step = min(chunk, padded_len)
        ids = torch.zeros(B, padded_len, dtype=torch.int64, device=dev)
        ids[:, padded_len - T:] = input_ids.to(dev)
        n_pad = (padded_len - lengths.to(dev))[:, None]
        positions = torch.arange(padded_len, device=dev)[None, :] - n_pad  # pads negative ("virtual" positions)
        logits = None
        for start in range(0, padded_len, step):
            pos = positions[:, start:start + step]
            self.store.step_positions(step).copy_(pos)
            logits = self.step_fn(self.model, ids[:, start:start + step], pos.clamp(min=0))
        self.store.seen.copy_(lengths.to(dev))
        return logits

    @staticmethod
    def padded_length(length: int, chunk: int) -> int:
        return padded_prompt_length(length, chunk)

    def decode_step(self, sampling: tuple, eos: torch.Tensor | None, pad_id: int) -> None:
        """One token per sequence; device tensors only (capturable in a CUDA graph)."""
        positions = self.store.step_positions(1)
        positions.copy_(self.store.seen[:, None])
        logits = self.step_fn(self.model, self.cur_tok, positions)
        self._emit(sample_next(self.hold_eos(logits, eos), *sampling), eos, pad_id)
        self.store.seen.add_(1)

    def hold_eos(self, logits: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
        """logits [B, V] with EOS made impossible while fewer than `min_new_tokens` tokens
        are out (HF's min_new_tokens rule); the step index is a device tensor, so no sync."""
        if not self.min_new_tokens or eos is None:
            return logits
        is_eos = torch.isin(torch.arange(logits.shape[-1], device=logits.device), eos)
        return logits.masked_fill(is_eos & (self.step_idx < self.min_new_tokens), float("-inf"))

    def _emit(self, nxt: torch.Tensor, eos: torch.Tensor | None, pad_id: int) -> None:
        nxt = torch.where(self.finished, torch.full_like(nxt, pad_id), nxt)
        if eos is not None:
            self.finished |= torch.isin(nxt, eos)
        self.out.index_copy_(1, self.step_idx, nxt[:, None])
        self.step_idx.add_(1)
        self.cur_tok.copy_(nxt[:, None])


_GENERATORS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_KEEP_PER_MODEL = 4
_CODEGENS = ("auto", "eager", "inductor", "slimfx")  # generators (stores + compiled graphs) kept per model, least recently used dropped


def _config_key(config) -> str | None:
    """The configuration as loaded (None, the default's Config; a TOML path, its dict and its
    Config are one key), so the ways into the runtime (slimfx.runtime.generate, a routed HF
    generate, slimfx run) share one generator and its compiled graphs."""
    from slimfx.compiler.config import load_config

    return repr(load_config(config).to_dict())


def get_generator(model, batch: int, capacity: int, *, capacities: dict | None = None, config=None, codegen: str = "auto") -> Generator:
    """The cached Generator of `model` for this shape, built (and compiled lazily) on first use."""
    if codegen not in _CODEGENS:
        raise GenerateError(f"codegen: got {codegen!r}; allowed: {', '.join(_CODEGENS)}")
    key = (batch, capacity, tuple(sorted((capacities or {}).items())), _config_key(config), codegen)
    cache = _GENERATORS.setdefault(model, OrderedDict())
    gen = cache.pop(key, None) or Generator(model, batch, capacity, capacities=capacities, config=config, codegen=codegen)
    cache[key] = gen
    while len(cache) > _KEEP_PER_MODEL:
        cache.popitem(last=False)
    return gen


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 128,
    min_new_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
    capacity: int | None = None,
    capacities: dict | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    prefill_chunk: int = 512,
    callback: Callable[[torch.Tensor, int], None] | None = None,
    stream_interval: int = 16,
    cuda_graph: bool | None = None,
    seed: int | None = None,
    config=None,
    codegen: str = "auto",
    sliding_window: bool = False,
) -> GenerateOutput:
    """Generate `max_new_tokens` tokens for a batch of prompts with the slimfx KV runtime.

    model: an HF causal LM (unmodified; compiled here with backend="slimfx").
    input_ids [B, T] int, left-padded when `attention_mask` [B, T] (1 = token) is given.
    capacity: KV slots per attention site (default: padded prompt + new tokens, so the
      result equals the unmodified model's); capacities: {site: slots} overrides. A
      capacity below what the request writes (longest prompt + max_new_tokens - 1, or a
      sliding-window layer's window) is a ConfigError unless sliding_window=True: then
      such a site keeps only its `capacity` most recent tokens (lossy) and
      stats["sliding_window"] says how many (None when nothing was dropped).
    temperature 0 = greedy; top_k (0 = off), top_p (1 = off) restrict sampling.
    eos_token_id: stop a sequence there (later tokens are pad_token_id); the loop ends
      early when all sequences have finished (checked every `stream_interval` steps).
    min_new_tokens: EOS cannot be chosen before this many new tokens.
    callback(tokens [B, k] CPU int64, first_index): called with each new run of tokens,
      every `stream_interval` steps (the only host syncs of the loop) and at the end.
    cuda_graph: capture the decode step in a CUDA graph (default: on for CUDA models).
    seed: seeds torch's generator for sampling. config: a slimfx config (dict or TOML
      path) whose pipeline runs before `kv_runtime`. codegen: how the rewritten graph
      runs: "eager" (FX code), "inductor" (fused; store buffers as graph inputs),
      "slimfx" (slimfx's code generator), "auto" (the config's `compile.codegen` when
      it names one, else inductor on CUDA and eager on CPU).

    Returns GenerateOutput(tokens [B, max_new_tokens] int64 CPU, stats dict): see
    GenerateOutput for the stats keys (prefill_s, decode_s, tokens_per_s, kv_bytes...).
    """
    check_generate_args(max_new_tokens, min_new_tokens, prefill_chunk, stream_interval, temperature, top_k, top_p)
    check_model_inputs(model, input_ids, capacities)
    lengths = prompt_lengths(input_ids, attention_mask)
    window = check_capacity(model, capacity, capacities, int(lengths.max()), max_new_tokens, sliding_window)
    # layer_skip's speculative and schedule modes run their own loop (runtime/skip_decode.py),
    # loaded by name: it builds on this module.
    skipping = importlib.import_module("slimfx.runtime.skip_decode") if config is not None else None
    if skipping is not None and skipping.skip_mode(config) is not None:
        out = skipping.generate_skipping(
            model, input_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, attention_mask=attention_mask,
            capacity=capacity, capacities=capacities, sampling=(float(temperature), int(top_k), float(top_p)),
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, prefill_chunk=prefill_chunk, callback=callback,
            stream_interval=stream_interval, cuda_graph=cuda_graph, seed=seed, config=config, codegen=codegen)
        out.stats["sliding_window"] = window
        return out
    B, T = input_ids.shape
    if config is not None:
        from slimfx.compiler.pipeline import prefill_chunk as chunk_for, specialise

        config = specialise(config, int(lengths.max()))
        prefill_chunk = chunk_for(config, T, prefill_chunk)  # e.g. eviction after the whole prompt: one chunk
    padded = padded_prompt_length(T, prefill_chunk)
    if capacity is None:
        capacity = -(-(padded + max_new_tokens) // 256) * 256  # rounded so nearby calls share a store
    from slimfx.runtime.models import kv_fit_problem

    held = sum(g.store.nbytes() for g in _GENERATORS.get(model, {}).values())  # a cached generator reuses its store
    problem = kv_fit_problem(model, capacity, B, held=held)
    if problem:
        raise GenerateError(f"capacity {capacity} (prompt + max_new_tokens {max_new_tokens}): {problem}")
    if seed is not None:
        torch.manual_seed(seed)
    gen = get_generator(model, B, capacity, capacities=capacities, config=config, codegen=codegen)
    out = run_generation(gen, input_ids, lengths, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         sampling=(float(temperature), int(top_k), float(top_p)), eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, prefill_chunk=prefill_chunk, callback=callback,
                         stream_interval=stream_interval, cuda_graph=cuda_graph)
    out.stats["sliding_window"] = window
    return out


def check_generate_args(max_new_tokens, min_new_tokens, prefill_chunk, stream_interval, temperature, top_k, top_p) -> None:
    """GenerateError (one line) for the first argument of generate() out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens: got {max_new_tokens!r}; allowed: an integer >= 1")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise GenerateError(f"min_new_tokens: got {min_new_tokens!r}; allowed: an integer >= 0")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 16 or prefill_chunk & (prefill_chunk - 1):
        raise GenerateError(f"prefill_chunk: got {prefill_chunk!r}; allowed: a power of two >= 16")
    if not isinstance(stream_interval, int) or stream_interval < 1:
        raise GenerateError(f"stream_interval: got {stream_interval!r}; allowed: an integer >= 1")
    _check_sampling(temperature, top_k, top_p)


def kv_need(longest_prompt: int, max_new_tokens: int) -> int:
    """KV slots a site fills over a request: the longest prompt's real tokens (left padding
    is never stored) and every new token but the last (sampled, never fed back)."""
    return longest_prompt + max_new_tokens - 1


def check_capacity(model, capacity, capacities, longest_prompt: int, max_new_tokens: int, sliding_window: bool, *,
                   names=("capacity", "capacities", "sliding_window=True")) -> int | None:
    """The sliding window a request runs with: None when every site holds all it attends
    to, else the fewest slots of a site that wraps (allowed only with `sliding_window`;
    otherwise a ConfigError naming the capacity, the need and the opt-in). A sliding-window
    layer needs only its window. `names`: the argument names as the caller's user wrote them."""
    from slimfx.compiler.config import ConfigError

    def count(n):
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if capacity is not None and not count(capacity):
        raise GenerateError(f"{names[0]}: got {capacity!r}; allowed: an integer >= 1")
    for site, n in (capacities or {}).items():
        if not count(n):
            raise GenerateError(f"{names[1]}[{site}]: got {n!r}; allowed: an integer >= 1")
    need = kv_need(longest_prompt, max_new_tokens)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None) or 0
    windows = site_windows(model)
    slots = {site: need if capacity is None else capacity for site in range(layers)} or {None: capacity or need}
    slots.update(capacities or {})
    wanted = {site: min(need, windows.get(site, need)) for site in slots}
    short = {site: n for site, n in slots.items() if n < wanted[site]}
    if not short or sliding_window:
        return min(short.values(), default=None)
    site, n = min(short.items(), key=lambda item: (item[0] in windows, item[1]))
    what = f"{names[1]}[{site}] {n}" if site in (capacities or {}) else f"{names[0]} {n}"
    why = (f"the request writes {need} KV slots per attention site (longest prompt {longest_prompt} tokens + "
           f"max_new_tokens {max_new_tokens} - 1)") if wanted[site] == need else \
        f"sliding-window layer {site} attends to its last {wanted[site]} tokens"
    raise ConfigError(f"{what}: {why}; allowed: at least {wanted[site]}, or {names[2]} to keep only the {n} most recent "
                      "tokens (lossy)")


def check_model_inputs(model, input_ids, capacities) -> None:
    """GenerateError (one line) for a token id the model's embedding has no row for (a bare
    IndexError deep in the graph otherwise), and for `capacities` naming an attention site
    the model cannot have (it would be ignored without a word)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if vocab is not None and isinstance(input_ids, torch.Tensor) and input_ids.numel() and not input_ids.is_floating_point():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise GenerateError(f"input_ids: token id {lo if lo < 0 else hi} is outside the vocabulary; allowed: 0-{vocab - 1}")
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for site in capacities or {}:
        if layers is not None and not (isinstance(site, int) and not isinstance(site, bool) and 0 <= site < layers):
            raise GenerateError(f"capacities: site {site!r} does not exist; allowed: attention sites 0-{layers - 1} "
                                f"(the model has {layers} layers)")


def use_cuda_graph(device: torch.device, cuda_graph: bool | None) -> bool:
    """Whether the decode step is captured in a CUDA graph (default: on CUDA devices)."""
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise GenerateError("cuda_graph=True needs a model on a CUDA device")
    return use_graph


def eos_tensor(eos_token_id, device: torch.device) -> torch.Tensor | None:
    """eos_token_id (an int, a list of ints or None) as the int64 tensor the loop compares with."""
    if eos_token_id is None:
        return None
    return torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.int64, device=device)


def begin_generation(gen, batch: int, max_new_tokens: int, min_new_tokens: int, pad_token_id: int) -> None:
    """A generator's per-call state set for a new generation: empty store, no tokens yet."""
    gen.store.reset()
    gen.out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.int64, device=gen.store.device)
    gen.finished.zero_()
    gen.step_idx.zero_()
    gen.min_new_tokens = min_new_tokens


def run_generation(gen, input_ids: torch.Tensor, lengths: torch.Tensor, *, max_new_tokens: int, min_new_tokens: int,
                   sampling: tuple, eos_token_id, pad_token_id: int, prefill_chunk: int, callback, stream_interval: int,
                   cuda_graph: bool | None) -> GenerateOutput:
    """The generation loop over a generator (a Generator, or a loaded package's): prefill,
    the first token, then the decode loop. Arguments are checked by the caller."""
    device = gen.store.device
    B = input_ids.shape[0]
    use_graph = use_cuda_graph(device, cuda_graph)
    eos = eos_tensor(eos_token_id, device)

    with torch.inference_mode(), user_errors():
        begin_generation(gen, B, max_new_tokens, min_new_tokens, pad_token_id)
        sync_device(device)
        t0 = time.perf_counter()
        logits = gen.prefill(input_ids, lengths, prefill_chunk)
        gen._emit(sample_next(gen.hold_eos(logits, eos), *sampling), eos, pad_token_id)
        sync_device(device)
        t_prefill = time.perf_counter() - t0
        loop = _DecodeLoop(gen, sampling, eos, pad_token_id, use_graph, callback, stream_interval)
        stats = loop.run(max_new_tokens - 1)
    stats.update(prefill_s=t_prefill, kv_bytes=gen.store.nbytes(), cuda_graph=use_graph, new_tokens=max_new_tokens, batch=B, codegen=gen.codegen)
    return GenerateOutput(gen.out.cpu(), stats)


class _DecodeLoop:
    """Runs the decode steps: a few warm-up steps (compile; on CUDA then graph capture),
    then the timed steps, streaming every `interval` steps."""

    WARMUP = 2

    def __init__(self, gen, sampling, eos, pad_id, use_graph, callback, interval):
        self.gen, self.sampling, self.eos, self.pad_id = gen, sampling, eos, pad_id
        self.use_graph, self.callback, self.interval = use_graph, callback, interval
        self.streamed = 0
        self.done = 1  # the first token came from prefill

    def step(self) -> None:
        self.gen.decode_step(self.sampling, self.eos, self.pad_id)

    def run(self, steps: int) -> dict:
        device = self.gen.store.device
        t0 = time.perf_counter()
        warm = min(steps, self.WARMUP)
        run_step = self._warm_up(warm) if self.use_graph and steps > warm else self._eager_warm_up(warm)
        self.done += warm
        sync_device(device)
        warmup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        timed = 0
        while self.done < steps + 1:
            run_step()
            self.done += 1
            timed += 1
            if self.done % self.interval == 0 and self._stream_and_check_finished():
                break
        sync_device(device)
        decode_s = time.perf_counter() - t1
        self._stream_and_check_finished()
        batch = self.gen.store.batch
        return {
            "warmup_s": warmup_s,
            "decode_s": decode_s,
            "decode_steps": timed,
            "ms_per_step": 1e3 * decode_s / timed if timed else float("nan"),
            "tokens_per_s": batch * timed / decode_s if timed and decode_s > 0 else float("nan"),
        }

    def _eager_warm_up(self, warm: int) -> Callable:
        for _ in range(warm):
            self.step()
        return self.step

    def _warm_up(self, warm: int) -> Callable:
        """Warm-up steps on a side stream (as torch.cuda.graphs requires), then capture one
        step. Capture records without executing, so the returned replay does the work."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warm):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph
        return graph.replay

    def _stream_and_check_finished(self) -> bool:
        """Hand new tokens to the callback; True when every sequence has finished (one sync)."""
        if self.callback is not None and self.done > self.streamed:
            self.callback(self.gen.out[:, self.streamed:self.done].cpu(), self.streamed)
            self.streamed = self.done
        return self.eos is not None and bool(self.gen.finished.all())
