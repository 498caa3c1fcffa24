"""`torch.ops.slimfx.attention`: one op per attention site = write the step's tokens into
the site's tiers + attention over them. DESIGN.md decisions 3 and 4.

    out = torch.ops.slimfx.attention(q, k, v, positions, buffers, scale, layout, softcap=0.0)

    q          [B, Hq, T, D]   queries of this step's T tokens (RoPE applied with true positions)
    k, v       [B, Hkv, T, D]  this step's keys/values (not repeated for GQA)
    positions  [B, T] int64    true positions of the step's tokens; negative = padding
    buffers    the site's tier buffers (runtime/kv_store.SiteCache.buffers()), mutated in place
    layout     SiteCache.layout: "<kind>" or "<kind>/<setting>/...": which variant runs the site
    softcap    optional, > 0: logit softcapping tanh(s / softcap) * softcap (plain sites only)
    returns    [B, Hq, T, D]   like SDPA's output

One op, many variants. A variant is a write strategy plus a read over the site's tiers;
it registers under its kind (`register_variant`) from the module that owns it:

    plain            here: the token goes to slot pos % C of the main tier
    read/<layout>    here: attends over another site's tiers as `layout` reads them, writes
                     nothing (cross-layer KV sharing: the owner, an earlier layer, wrote them)
    evict, duo, mikv passes/kv_eviction/: a policy picks the slot; DuoAttention's head groups;
                     MiKV's low-precision tier for evicted tokens
    select, tidal    passes/kv_eviction/: the whole cache kept, a decode step reads a chosen
                     subset (TokenSelect; TidalDecode, whose selection layers' choice the
                     following layers read from a tier they share)
    kvq              passes/kv_quantize/: quantize on write, sinks + recent tokens at full precision

Every variant reads through the same two functions, so every optimisation and switch
applies to all of them:

- `decode_read` (T == 1): one split-KV kernel over up to two tiers, with a dequantising
  load for tiers holding int8/fp8 codes and per-slot scales, an optional visibility
  window between the tiers, and the policies' attention-mass tracking on the first tier
  (codegen/kernels/decode_attention.py);
- `prefill_read` (T > 1): the chunk attends over the tiers as they were before it plus
  itself, read where it is (the store is not copied to append the chunk); a site of
  several or quantized tiers is first made one dense view.

Semantics shared by all variants (each variant's reference is the definition): a query
at position p sees every held token with 0 <= pos <= p; slots are matched by position,
never by order, so causality and left padding need no mask tensor. Padding tokens carry
negative "virtual" positions (t - n_pad) and write slot_pos = -1 (empty).

On CUDA tensors the reads run the Triton kernels (codegen/kernels/); elsewhere torch's
fused SDPA where it computes the references' definition (runtime/sdpa_reads.py; equal to
float rounding), else the references.
SLIMFX_ATTENTION=ref|triton|auto overrides (triton on CPU needs
TRITON_INTERPRET=1 set before the kernels are imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol

import torch

from slimfx.codegen.kernels import use_attention_kernels
from slimfx.compiler.errors import UsageError
from slimfx.codegen.kernels.decode_attention import decode_attention_ref
from slimfx.runtime.sdpa_reads import decode_sdpa, prefill_sdpa
from slimfx.runtime.custom_ops import custom_op

Tiers = dict[str, dict[str, torch.Tensor]]  # tier name -> field -> buffer


class Variant(Protocol):
    fields: tuple[str, ...]  # "tier.field" of each buffer, in the op's order

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool) -> torch.Tensor:
        """Write the step's tokens, attend over the tiers (the site's own attention)."""

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool) -> torch.Tensor:
        """Attend over the tiers as they are, writing nothing (a site reading another's cache)."""


_VARIANTS: dict[str, Callable[..., Variant]] = {}


def register_variant(kind: str, make: Callable[..., Variant]) -> None:
    """Make layouts "<kind>/<setting>/..." run `make(*settings)` (settings as strings)."""
    _VARIANTS[kind] = make


def layout_string(kind: str, *settings) -> str:
    """The layout naming variant `kind` with `settings` (floats keep every digit)."""
    return "/".join([kind, *(repr(s) if isinstance(s, float) else str(s) for s in settings)])


@lru_cache(maxsize=None)
def variant_of(layout: str) -> Variant:
    kind, *settings = layout.split("/")
    make = _VARIANTS.get(kind)
    if make is None:
        raise ValueError(f"slimfx::attention layout {layout!r}: no variant {kind!r} is registered; "
                         f"registered: {', '.join(sorted(_VARIANTS))} (a pass module registers its variant when imported)")
    try:
        return make(*settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"slimfx::attention layout {layout!r}: settings {settings} do not fit variant {kind!r} ({exc})") from None


def unpack(variant: Variant, buffers, layout: str) -> Tiers:
    if len(buffers) != len(variant.fields):
        raise ValueError(f"slimfx::attention layout {layout!r}: got {len(buffers)} buffers; allowed: {len(variant.fields)} "
                         f"({', '.join(variant.fields)})")
    tiers: Tiers = {}
    for name, buf in zip(variant.fields, buffers):
        tier, _, field = name.partition(".")
        tiers.setdefault(tier, {})[field] = buf
    return tiers


# ----------------------------------------------------------------------------- reads


@dataclass
class TierRead:
    """One tier as a read sees it: k, v [B, Hkv, C, D] (codes when scales are given, with
    x ~ code * scale per slot), pos [B, Hkv, C] (-1 = not read)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is None:
            return self.k.to(dtype), self.v.to(dtype)
        return ((self.k.float() * self.k_scale[..., None]).to(dtype), (self.v.float() * self.v_scale[..., None]).to(dtype))


def _windowed(tiers: list[TierRead], window) -> list[torch.Tensor]:
    """Each tier's positions with the window applied (module doc of decode_attention):
    the first tier reads [lo, hi), the second everything else."""
    if window is None:
        return [t.pos for t in tiers]
    lo, hi = window
    hi = hi.view(-1, 1, 1)
    first = torch.where((tiers[0].pos >= lo) & (tiers[0].pos < hi), tiers[0].pos, -1)
    rest = [torch.where((t.pos >= 0) & ((t.pos < lo) | (t.pos >= hi)), t.pos, -1) for t in tiers[1:]]
    return [first, *rest]


def decode_read(q, q_pos, tiers: list[TierRead], scale: float, triton: bool, *, scores=None, decay: float = 1.0, window=None):
    """Attention of one query token per sequence over one or two tiers -> [B, Hq, 1, D].
    scores (the first tier's, [B, Hkv, C] f32) get decay * scores + each slot's attention
    mass, normalised over both tiers. window: (lo, hi [B]) as decode_attention says."""
    q1 = q[:, :, 0]
    q1 = q1 if q1.stride(-1) == 1 else q1.contiguous()
    first = tiers[0]
    kwargs = dict(scale=scale, scores=scores, decay=decay, window=window, k_scale=first.k_scale, v_scale=first.v_scale)
    if len(tiers) > 1:
        second = tiers[1]
        kwargs["second"] = (second.k, second.v, second.pos) + (() if second.k_scale is None else (second.k_scale, second.v_scale))
    if triton:
        from slimfx.codegen.kernels.decode_attention import decode_attention

        out = decode_attention(q1, first.k, first.v, first.pos, q_pos, **kwargs)
    elif len(tiers) == 1 and scores is None and window is None and first.k_scale is None:
        out = decode_sdpa(q1, first.k, first.v, first.pos, q_pos, scale)
    else:
        out = decode_attention_ref(q1, first.k, first.v, first.pos, q_pos, **kwargs)
    return out.unsqueeze(2)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def prefill_read(q, positions, tiers: list[TierRead], scale: float, triton: bool, *, chunk=None, window=None, sliding=None):
    """Attention of a chunk of queries over the tiers (+ `chunk` = (k, v, positions), the
    chunk's own keys, read where they are) -> [B, Hq, T, D]. sliding: a sliding window
    of that many positions per query (codegen/kernels/prefill_attention.py)."""
    qc = _contiguous(q)
    only = tiers[0]
    if len(tiers) == 1 and only.k_scale is None and window is None:
        keys, vals, kpos = only.k, only.v, only.pos
    else:
        dtype = q.dtype if triton else torch.float32
        dense = [t.dense(dtype) for t in tiers]
        keys = torch.cat([d[0] for d in dense], dim=2)
        vals = torch.cat([d[1] for d in dense], dim=2)
        kpos = torch.cat([p.to(torch.int64) for p in _windowed(tiers, window)], dim=2)
    if chunk is not None:
        chunk = (_contiguous(chunk[0]), _contiguous(chunk[1]), chunk[2])
    if triton:
        from slimfx.codegen.kernels.prefill_attention import prefill_attention

        return prefill_attention(qc, positions, keys, vals, kpos, extra=chunk, scale=scale, window=sliding)
    return prefill_sdpa(qc, positions, keys, vals, kpos, extra=chunk, scale=scale, window=sliding)


# ----------------------------------------------------------------------------- the plain variant


def write_tokens(k, v, positions, k_cache, v_cache, slot_pos, triton: bool = False) -> None:
    """Write a step's tokens into their slots (pos % C), in place; pads mark their slot empty.
    k, v [B, Hkv, T, D]; positions [B, T]. Only the last C tokens are written when T > C
    (earlier ones would be overwritten within the same chunk). One kernel on the Triton path."""
    if triton and k.stride(-1) == 1 and v.stride(-1) == 1:
        from slimfx.codegen.kernels.evict_write import ring_write

        ring_write(k, v, positions, k_cache, v_cache, slot_pos)
        return
    B, Hkv, T, D = k.shape
    C = k_cache.shape[2]
    if T > C:
        k, v, positions, T = k[:, :, -C:], v[:, :, -C:], positions[:, -C:], C
    slots = positions.remainder(C)[:, None, :].expand(B, Hkv, T)
    idx = slots[..., None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, idx, k.to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.to(v_cache.dtype))
    true_pos = torch.where(positions < 0, -1, positions).to(slot_pos.dtype)
    slot_pos.scatter_(2, slots, true_pos[:, None, :].expand(B, Hkv, T))


class Plain:
    """Ring write to slot pos % C of the main tier, read the main tier. With capacity >= the
    total length nothing is overwritten and the result is exact.

    layout plain/<W>: a sliding-window layer (attends to its W most recent positions). Its
    tier is a ring of at most W slots: after a decode step's write it holds exactly the
    positions the query may see, and a prefill chunk, which reads its own keys where they
    are, masks each query's older positions (prefill_read's `sliding`)."""

    fields = ("main.k", "main.v", "main.slot_pos")

    def __init__(self, window: str = "0"):
        self.window = int(window) or None

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main = tiers["main"]
        store = TierRead(main["k"], main["v"], main["slot_pos"])
        if q.shape[2] == 1:
            write_tokens(k, v, positions, main["k"], main["v"], main["slot_pos"], triton)
            self._check_ring(main["k"].shape[2])
            return decode_read(q, positions[:, 0], [store], scale, triton)
        out = prefill_read(q, positions, [store], scale, triton, chunk=(k, v, positions), sliding=self.window)
        write_tokens(k, v, positions, main["k"], main["v"], main["slot_pos"], triton)
        return out

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        main = tiers["main"]
        if q.shape[2] == 1:
            self._check_ring(main["k"].shape[2])
        store = TierRead(main["k"], main["v"], main["slot_pos"])
        if q.shape[2] == 1:
            return decode_read(q, positions[:, 0], [store], scale, triton)
        return prefill_read(q, positions, [store], scale, triton, sliding=self.window)

    def _check_ring(self, capacity: int) -> None:
        if self.window is not None and capacity > self.window:
            raise ValueError(f"slimfx::attention layout 'plain/{self.window}': a ring of {capacity} slots would show the decode "
                             f"query positions outside its window; allowed: at most {self.window} slots")


def read_tiers(q, positions, reads: list[TierRead], scale: float, triton: bool, window=None):
    """Attention over `reads` as they are, for a decode step or a prefill chunk."""
    if q.shape[2] == 1:
        return decode_read(q, positions[:, 0], reads, scale, triton, window=window)
    return prefill_read(q, positions, reads, scale, triton, window=window)


class Read:
    """A site that reads another site's tiers (layout read/<the owner's layout>): the owner's
    variant's read, no write. The owner is an earlier layer, so within a step it has
    written the step's tokens by the time this site runs."""

    def __init__(self, *owner_layout: str):
        self.inner = variant_of("/".join(owner_layout))
        self.fields = self.inner.fields

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        return self.inner.read(q, positions, tiers, scale, triton)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        return self.inner.read(q, positions, tiers, scale, triton)


register_variant("plain", Plain)
register_variant("read", Read)


# ----------------------------------------------------------------------------- logit softcapping


def softcap_read(q, positions, keys, vals, kpos, scale: float, cap: float, window: int | None = None) -> torch.Tensor:
    """Attention with logit softcapping (Gemma-2): scores s = q.k * scale become
    tanh(s / cap) * cap before the softmax. q [B, Hq, T, D], positions [B, T]; keys, vals
    [B, Hkv, N, D]; kpos [B, Hkv, N] (-1 = empty). A query at p sees 0 <= pos <= p (and
    pos > p - window on a sliding site). Plain PyTorch in float32 on every device: the
    Triton kernels have no softcap, and a softcapped model is exact here at a dense read's cost."""
    B, Hq, T, D = q.shape
    Hkv = keys.shape[1]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, T, D)
    s = torch.einsum("bhgtd,bhnd->bhgtn", qg, keys.float()) * scale
    s = torch.tanh(s / cap) * cap
    qp, kp = positions[:, None, None, :, None], kpos.to(torch.int64)[:, :, None, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible &= kp > qp - window
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, 0.0)  # a padding query sees nothing
    return torch.einsum("bhgtn,bhnd->bhgtd", p, vals.float()).reshape(B, Hq, T, D)


def _softcapped(variant: Variant, layout: str, q, k, v, positions, tiers: Tiers, scale: float, cap: float, triton: bool):
    """A plain site (or a reader of one) with logit softcapping: the step's tokens read with
    the store as it was before them, then written (as Plain does)."""
    plain = variant.inner if isinstance(variant, Read) else variant
    if not isinstance(plain, Plain):
        raise UsageError(f"slimfx::attention layout {layout!r} with softcap {cap:g}: logit softcapping is read by the plain "
                         f"variant only; allowed: plain sites (no kv_eviction or kv_quantize on a softcapped model)")
    main = tiers["main"]
    if isinstance(variant, Read):
        return softcap_read(q, positions, main["k"], main["v"], main["slot_pos"], scale, cap, plain.window)
    B, Hkv, T, _ = k.shape
    chunk_pos = torch.where(positions < 0, -1, positions)[:, None, :].expand(B, Hkv, T)
    keys, vals = torch.cat([main["k"].float(), k.float()], dim=2), torch.cat([main["v"].float(), v.float()], dim=2)
    out = softcap_read(q, positions, keys, vals, torch.cat([main["slot_pos"].to(torch.int64), chunk_pos], dim=2),
                       scale, cap, plain.window)
    write_tokens(k, v, positions, main["k"], main["v"], main["slot_pos"], triton)
    return out


# ----------------------------------------------------------------------------- the op


@custom_op("slimfx::attention", mutates_args=("buffers",))
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              buffers: list[torch.Tensor], scale: float, layout: str, softcap: float = 0.0) -> torch.Tensor:
    """Cache update + attention of one site (module doc). Triton on CUDA, reference elsewhere.
    softcap > 0: the scores get logit softcapping (`softcap_read`)."""
    variant = variant_of(layout)
    tiers = unpack(variant, buffers, layout)
    if softcap:
        out = _softcapped(variant, layout, q, k, v, positions, tiers, scale, softcap, use_attention_kernels(q))
    else:
        out = variant.run(q, k, v, positions, tiers, scale, use_attention_kernels(q))
    return out.to(q.dtype).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, positions, buffers, scale, layout, softcap=0.0):
    return q.new_empty(q.shape)  # contiguous, like the real op (empty_like would copy q's strides)


def attention_ref(q, k, v, positions, cache, scale: float | None = None) -> torch.Tensor:
    """The op's definition on a SiteCache (mutates its tiers like the op), in plain PyTorch."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    variant = variant_of(cache.layout)
    tiers = unpack(variant, cache.buffers(), cache.layout)
    return variant.run(q, k, v, positions, tiers, scale, False).to(q.dtype)
