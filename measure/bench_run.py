"""The measuring half of `slimfx bench`: decode and prefill timings of one model under
HF eager (DynamicCache), HF + inductor `reduce-overhead` (StaticCache, CUDA graphs) and
slimfx, in one process, with the device's copy bandwidth measured beside them.

Decode figures: after `warmup` steps, `steps` greedy steps are timed as one block
(device events on CUDA) and divided: ms per step, tokens/s = batch * 1000 / ms.
Bytes per step (for GB/s and the fraction of copy bandwidth) are counted the same way
for every backend: the weights read (all parameters, less an untied input embedding,
of which a step reads one row per sequence) plus the KV of the tokens in context at the
middle of the timed block, K and V once each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slimfx.measure.footprint import model_footprint
from slimfx.measure.lm import cache_bytes
from slimfx.measure.timing import Timer


@dataclass
class BenchSettings:
    context: int = 1024
    batches: tuple = (1, 8)
    steps: int = 64
    warmup: int = 8
    config: object = None  # slimfx config (dict or TOML path) for the slimfx backend
    seed: int = 0
    codegen: str = "auto"  # how slimfx lowers its graphs (runtime.generate's `codegen`)


def bytes_per_step(model, batch: int, context: int) -> int:
    fp = model_footprint(model)
    weights = fp["weight_bytes"]
    if not fp["head_tied"]:
        embed = model.get_input_embeddings().weight
        weights -= embed.numel() * embed.element_size()
    return weights + batch * context * fp["kv_bytes_per_token"]


# ----------------------------------------------------------------------------- HF loops


def _hf_step(fn, tok, cache, pos):
    out = fn(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos,
             position_ids=pos[None].expand(tok.shape[0], 1))
    return out.logits[:, -1:].argmax(-1)


class HFBackend:
    """HF model stepped by hand. eager: DynamicCache, plain forward. inductor:
    StaticCache, decode step through torch.compile(mode='reduce-overhead') (CUDA graphs
    on CUDA), prefill uncompiled as HF generate does it."""

    def __init__(self, name: str, model, capacity: int):
        self.name, self.model, self.capacity = name, model, capacity
        self.compiled = None
        self.reset_compile()

    def reset_compile(self):
        if self.name == "inductor":
            torch._dynamo.reset()
            self.compiled = torch.compile(self.model.forward, mode="reduce-overhead", dynamic=False)

    def new_cache(self):
        from transformers import DynamicCache, StaticCache

        if self.name == "eager":
            return DynamicCache(config=self.model.config)
        return StaticCache(config=self.model.config, max_cache_len=self.capacity)

    def prefill(self, ids, cache):
        pos = torch.arange(ids.shape[1], device=ids.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos,
                         position_ids=pos[None].expand(ids.shape[0], -1))
        return out.logits[:, -1:].argmax(-1)

    def step(self, tok, cache, pos):
        if self.compiled is None:
            return _hf_step(self.model, tok, cache, pos)
        torch.compiler.cudagraph_mark_step_begin()
        return _hf_step(self.compiled, tok, cache, pos)


@torch.no_grad()
def measure_hf(backend: HFBackend, batch: int, s: BenchSettings, device: torch.device) -> dict:
    """Prefill + decode timings of one HF backend at one batch size."""
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    ids = torch.randint(0, backend.model.config.vocab_size, (batch, s.context), generator=gen).to(device)
    positions = torch.arange(s.context, s.context + s.warmup + s.steps + 1, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    backend.prefill(ids, backend.new_cache())  # warm-up prefill (kernels, allocator)
    cache = backend.new_cache()
    with Timer(device) as t_prefill:
        tok = backend.prefill(ids, cache)
    with Timer(device) as t_first:  # the first compiled call compiles (cold or warm)
        tok = backend.step(tok, cache, positions[0:1])
    for i in range(1, s.warmup):
        tok = backend.step(tok, cache, positions[i:i + 1])
    with Timer(device) as t_decode:
        for i in range(s.warmup, s.warmup + s.steps):
            tok = backend.step(tok, cache, positions[i:i + 1])
    return _figures(backend.model, batch, s, device, t_prefill.ms, t_decode.ms / s.steps,
                    first_step_s=t_first.wall_s, kv_bytes=cache_bytes(cache))


def _figures(model, batch, s, device, prefill_ms, ms_per_step, first_step_s, kv_bytes) -> dict:
    mid_context = s.context + s.warmup + s.steps // 2
    return {
        "batch": batch,
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": ms_per_step,
        "tokens_per_s": batch * 1e3 / ms_per_step,
        "bytes_per_step": bytes_per_step(model, batch, mid_context),
        "first_step_s": first_step_s,
        "kv_bytes": kv_bytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


# ----------------------------------------------------------------------------- slimfx


def slimfx_loop() -> str:
    try:
        from slimfx.runtime.generate import generate  # noqa: F401
    except ImportError:
        return "torch.compile(model.forward, backend='slimfx') + HF StaticCache (slimfx.runtime.generate not available)"
    return "slimfx.runtime.generate (kv_runtime store, static shapes, CUDA graph on CUDA)"


@torch.no_grad()
def measure_slimfx(model, batch: int, s: BenchSettings, device: torch.device) -> dict:
    """slimfx through its own generation loop: one call to compile and capture, a second
    one timed. Returns the figures plus the compile time of the first call."""
    from slimfx.runtime.generate import generate

    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, s.context), generator=gen).to(device)
    new = 1 + s.warmup + s.steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate(model, ids, max_new_tokens=new, config=s.config, codegen=s.codegen)  # first call: compiles
    first_call_s = time.perf_counter() - t0
    stats = generate(model, ids, max_new_tokens=new, config=s.config, codegen=s.codegen).stats
    out = _figures(model, batch, s, device, 1e3 * stats["prefill_s"], stats["ms_per_step"],
                   first_step_s=None, kv_bytes=stats["kv_bytes"])
    # Compile time = first call minus the same work once compiled.
    out["steady_call_s"] = stats["prefill_s"] + stats["warmup_s"] + stats["decode_s"]
    out["compile_s"] = first_call_s - out["steady_call_s"]
    out["cuda_graph"] = stats.get("cuda_graph")
    out["codegen"] = stats.get("codegen")  # how the generator lowered its graphs
    out["timed_steps"] = stats.get("decode_steps")
    return out


@torch.no_grad()
def _slimfx_warm_compile(model, s: BenchSettings, device: torch.device, steady_s: float) -> float:
    """One generate call after dynamo forgot its graphs (on-disk caches kept), less the
    same call compiled."""
    from slimfx.runtime.generate import generate

    torch._dynamo.reset()
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    ids = torch.randint(0, model.config.vocab_size, (s.batches[0], s.context), generator=gen).to(device)
    t0 = time.perf_counter()
    generate(model, ids, max_new_tokens=1 + s.warmup + s.steps, config=s.config, codegen=s.codegen)
    return time.perf_counter() - t0 - steady_s


def run_backend(name: str, model, s: BenchSettings, device: torch.device) -> dict:
    """Every batch size for one backend, plus cold and warm compile times."""
    capacity = -(-(s.context + s.warmup + s.steps + 1) // 256) * 256
    result = {"backend": name, "runs": []}
    try:
        if name == "slimfx":
            result["loop"] = slimfx_loop()
            for batch in s.batches:
                result["runs"].append(measure_slimfx(model, batch, s, device))
            result["cold_compile_s"] = result["runs"][0]["compile_s"]
            result["warm_compile_s"] = _slimfx_warm_compile(model, s, device, result["runs"][0]["steady_call_s"])
            # The generator's lowering (inductor on CUDA by default), not the pass
            # pipeline's internal "eager" stage that precedes it.
            result["codegen"] = result["runs"][0].get("codegen")
            return result
        backend = HFBackend(name, model, capacity)
        result["loop"] = {"eager": "HF forward, DynamicCache, prefill + one token per call",
                          "inductor": "torch.compile(model.forward, mode='reduce-overhead', dynamic=False), StaticCache; prefill uncompiled (as HF generate)"}[name]
        for batch in s.batches:
            result["runs"].append(measure_hf(backend, batch, s, device))
        if name == "inductor":
            # cold: first step with an empty inductor cache (a fresh cache folder per process);
            # warm: the same step after dynamo forgets the graph but the on-disk caches remain.
            result["cold_compile_s"] = result["runs"][0]["first_step_s"]
            backend.reset_compile()
            result["warm_compile_s"] = measure_hf(backend, s.batches[0], s, device)["first_step_s"]
    except Exception as exc:  # one backend failing must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def add_bandwidth(result: dict, copy_gbps: float) -> None:
    for run in result.get("runs", []):
        gbps = run["bytes_per_step"] / (run["decode_ms_per_token"] / 1e3) / 1e9
        run["achieved_gbps"] = gbps
        run["fraction_of_copy_bw"] = gbps / copy_gbps
