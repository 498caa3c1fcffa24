"""The KV store: fixed-capacity, slot-based caches for every attention site.

DESIGN.md decision 2. One `KVStore` per generation setup (batch size, capacity,
dtype, device); one `SiteCache` per attention site, created when the `kv_runtime`
pass binds that site (so the store learns head counts from the graph's anatomy,
not from a model config).

A site's tokens live in one or more *tiers*. Every tier has

    slot_pos  [B, H, C] i32  true token position held by each slot; -1 = empty

and whatever buffers its layout needs, all indexed [B, H, C, ...]: keys and values
(`k`, `v` [B, H, C, D], or quantized codes), per-slot scales, an eviction policy's
accumulated attention mass (`scores` [B, H, C] f32), the kv-head indices it holds.
The first tier is `main`: the one a plain site has (k, v, slot_pos) and the one an
eviction policy manages. Passes add tiers without the store knowing what they mean:

    DuoAttention   main = the streaming heads' budget, `retrieval` = the other heads, whole
    MiKV           main = the high-precision budget, `low` = evicted tokens, quantized
    KV quantize    main = the quantized tokens, `full` = sinks and recent tokens at full precision

Every tier gets the same generic handling here: reset, rollback, byte count, and
the flat buffer list the attention op receives (`SiteCache.buffers`, tier by tier,
field by field, in insertion order). `SiteCache.layout` names how the op writes and
reads the site (runtime/attention_op.py): the store never interprets it.

Shared by all sites of the store:

    seen               [B] i64   tokens seen so far per sequence (= next position)
    step_positions(T)  [B, T] i64 static buffer holding the positions of the T tokens
                                 of the step being run; negative = padding token

Why per-head slot positions: per-head budgets (DuoAttention) must save real memory,
so two heads of one layer may hold different tokens in the same slot; everything
that reads the store masks by `slot_pos`, never by slot order.

Cross-layer sharing: `share(reader, owner)` makes a site read another site's tiers
(the reader's cache has `owner` set and holds no memory of its own).

All updates happen in place on the device (the `slimfx::attention` op writes the
tiers; the generator advances `seen`), so a decode step has static shapes and
addresses and can be captured in a CUDA graph.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

import torch


class KVStoreError(ValueError):
    """A store was asked for something it cannot do; one line naming what and what is allowed."""


@dataclass
class Tier:
    """Buffers holding some of a site's tokens (module doc). `heads`: the site's kv heads
    this tier holds when a pass splits them (None: all, in order). `exact_rollback`: False
    when forgetting the newest tokens cannot restore the tier as it was before them
    (accumulated scores, evicted or demoted tokens, overwritten full-precision copies).
    `fixed`: buffers whose contents are data rather than tokens (a saved package keeps
    them; every other buffer starts empty)."""

    buffers: dict[str, torch.Tensor]
    heads: tuple[int, ...] | None = None
    exact_rollback: bool = True
    fixed: tuple[str, ...] = ()  # buffers holding fixed data (head indices), not tokens

    def __post_init__(self):
        if "slot_pos" not in self.buffers:
            raise KVStoreError(f"Tier: buffers {sorted(self.buffers)} lack 'slot_pos'; allowed: any buffers plus slot_pos [B, H, C]")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def __getattr__(self, name: str) -> torch.Tensor:
        """Buffers read as attributes too (`tier.k`), for code that names its fields."""
        buffers = self.__dict__.get("buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"tier has no buffer {name!r}; it has {', '.join(buffers)}")

    @property
    def slot_pos(self) -> torch.Tensor:
        return self.buffers["slot_pos"]

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[2]

    @property
    def n_heads(self) -> int:
        return self.slot_pos.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def reset(self) -> None:
        """Empty every slot (in place: addresses stay valid for captured graphs)."""
        self.slot_pos.fill_(-1)
        if "scores" in self.buffers:
            self.buffers["scores"].zero_()

    def forget_from(self, keep: torch.Tensor) -> None:
        """Empty the slots of sequence b holding a position >= keep[b] (in place, no sync)."""
        drop = self.slot_pos.to(torch.int64) >= keep[:, None, None]
        self.slot_pos.masked_fill_(drop, -1)
        if "scores" in self.buffers:
            self.buffers["scores"].masked_fill_(drop, 0.0)


def plain_tier(batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype, device, scores: bool = False,
               heads: tuple[int, ...] | None = None) -> Tier:
    """An empty tier of k/v slots in `dtype` (+ an eviction policy's scores when asked)."""
    shape = (batch, n_heads, capacity, head_dim)
    buffers = {
        "k": torch.zeros(shape, dtype=dtype, device=device),
        "v": torch.zeros(shape, dtype=dtype, device=device),
        "slot_pos": torch.full(shape[:3], -1, dtype=torch.int32, device=device),
    }
    if scores:
        buffers["scores"] = torch.zeros(shape[:3], dtype=torch.float32, device=device)
    return Tier(buffers, heads=heads, exact_rollback=not scores)


def plain_site(batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype=torch.float32, device="cpu", index: int = 0,
               window: int | None = None) -> "SiteCache":
    """A standalone plain site (one main tier, empty), outside any store. window: a
    sliding-window layer's window; its ring holds at most that many slots."""
    if window:
        capacity = min(capacity, window)
    tiers = {"main": plain_tier(batch, n_heads, capacity, head_dim, dtype=dtype, device=device)}
    return SiteCache(index, head_dim, tiers, layout=f"plain/{window}" if window else "plain")


@dataclass
class SiteCache:
    """The tiers of one attention site (module doc); `tiers["main"]` always exists."""

    index: int
    head_dim: int
    tiers: dict[str, Tier]
    layout: str = "plain"
    owner: int | None = None  # set when this site reads another site's cache (cross-layer sharing)

    @property
    def main(self) -> Tier:
        return self.tiers["main"]

    # The main tier's buffers, by name (what most readers of a site want).
    @property
    def k(self) -> torch.Tensor:
        return self.main["k"]

    @property
    def v(self) -> torch.Tensor:
        return self.main["v"]

    @property
    def slot_pos(self) -> torch.Tensor:
        return self.main.slot_pos

    @property
    def scores(self) -> torch.Tensor | None:
        return self.main.buffers.get("scores")

    @property
    def heads(self) -> tuple[int, ...] | None:
        return self.main.heads

    @property
    def capacity(self) -> int:
        return self.main.capacity

    @property
    def n_kv_heads(self) -> int:
        return self.main.n_heads

    @property
    def total_kv_heads(self) -> int:
        """Kv heads of the whole site, every head group counted once when a pass split them."""
        if self.main.heads is None:
            return self.main.n_heads
        return sum(len(t.heads) for t in self.tiers.values() if t.heads is not None)

    def buffers(self) -> list[torch.Tensor]:
        """Every tier's buffers, tier by tier and field by field: the op's buffer list."""
        return [t for tier in self.tiers.values() for t in tier.buffers.values()]

    def fields(self) -> tuple[str, ...]:
        """Names of `buffers()`, as "tier.field"."""
        return tuple(f"{name}.{f}" for name, tier in self.tiers.items() for f in tier.buffers)

    def nbytes(self) -> int:
        if self.owner is not None:
            return 0  # the owner holds the memory
        return sum(tier.nbytes() for tier in self.tiers.values())

    def reset(self) -> None:
        for tier in self.tiers.values():
            tier.reset()

    def occupancy(self) -> torch.Tensor:
        """Filled main-tier slots per (sequence, kv head), [B, Hkv] (a device tensor; reading it syncs)."""
        return (self.slot_pos >= 0).sum(dim=-1)


def read_layout(layout: str) -> str:
    """The layout of a site reading a cache laid out as `layout` (runtime/attention_op.Read)."""
    return layout if layout.startswith("read/") else f"read/{layout}"


_REGISTRY: "weakref.WeakValueDictionary[str, KVStore]" = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()
_IDS = itertools.count()


def register_store(store: "KVStore") -> str:
    """Make `store` findable by the kv_runtime pass under `store.id`; returns the id."""
    with _REGISTRY_LOCK:
        _REGISTRY[store.id] = store
    return store.id


def get_store(store_id: str) -> "KVStore | None":
    """The live store registered under `store_id`, or None."""
    return _REGISTRY.get(store_id)


class KVStore:
    """Fixed-capacity KV caches of all attention sites of one model (see module doc).

    batch: sequences per step. capacity: default slots per site. capacities: per-site
    overrides {site index: slots}. windows: {site index: W} for sliding-window layers
    (their ring holds at most W slots). dtype/device: of the k/v buffers.
    """

    def __init__(self, batch: int, capacity: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 capacities: dict[int, int] | None = None, windows: dict[int, int] | None = None, store_id: str | None = None):
        if not isinstance(batch, int) or batch < 1:
            raise KVStoreError(f"KVStore batch: got {batch!r}; allowed: an integer >= 1")
        if not isinstance(capacity, int) or capacity < 1:
            raise KVStoreError(f"KVStore capacity: got {capacity!r}; allowed: an integer >= 1")
        for site, cap in (capacities or {}).items():
            if not isinstance(cap, int) or cap < 1:
                raise KVStoreError(f"KVStore capacities[{site}]: got {cap!r}; allowed: an integer >= 1")
        self.batch = batch
        self.capacity = capacity
        self.capacities = dict(capacities or {})
        self.windows = dict(windows or {})
        self.dtype = dtype
        self.device = torch.device(device)
        self.id = store_id or f"kvstore-{next(_IDS)}"
        self.sites: dict[int, SiteCache] = {}
        self.seen = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._step_positions: dict[int, torch.Tensor] = {}
        self._shared: dict[int, int] = {}  # reader site -> owner site
        register_store(self)

    # -- sites ---------------------------------------------------------------
    def capacity_of(self, index: int) -> int:
        return self.capacities.get(index, self.capacity)

    def site(self, index: int, n_kv_heads: int, head_dim: int) -> SiteCache:
        """The SiteCache of site `index`, allocated on first use (one plain main tier, empty)."""
        cache = self.sites.get(index)
        if cache is not None:
            if (cache.total_kv_heads, cache.head_dim) != (n_kv_heads, head_dim):
                raise KVStoreError(
                    f"KVStore site {index}: already holds {cache.total_kv_heads} kv heads x {cache.head_dim}; "
                    f"asked for {n_kv_heads} x {head_dim} (one store serves one model)"
                )
            return cache
        if index in self._shared:
            cache = self._bind_shared(index)
            if (cache.total_kv_heads, cache.head_dim) != (n_kv_heads, head_dim):
                raise KVStoreError(f"KVStore site {index}: shares site {cache.owner}'s cache of {cache.total_kv_heads} kv heads x "
                                   f"{cache.head_dim} but has {n_kv_heads} x {head_dim}; allowed: an owner of the same head shape")
            return cache
        cache = plain_site(self.batch, n_kv_heads, self.capacity_of(index), head_dim, dtype=self.dtype, device=self.device,
                           index=index, window=self.windows.get(index))
        self.sites[index] = cache
        return cache

    def relayout(self, index: int, layout: str, tiers: dict[str, Tier]) -> SiteCache:
        """Give site `index` new tiers read and written the way `layout` says (a pass calls
        this when it changes how a site stores its tokens). The SiteCache object stays the
        same; the old buffers are dropped once nothing references them, so graphs bound to
        them must be rebound (passes/_graph.bind_site)."""
        if "main" not in tiers:
            raise KVStoreError(f"KVStore.relayout site {index}: tiers {sorted(tiers)} lack 'main'")
        cache = self.sites[index]
        if cache.owner is not None:
            raise KVStoreError(f"KVStore.relayout site {index}: it reads site {cache.owner}'s cache; relay the owner out instead")
        cache.tiers = dict(tiers)
        cache.layout = layout
        self.capacities[index] = cache.capacity
        for reader in self.readers_of(index):  # they read the owner's tiers, as the owner now lays them out
            reader.tiers, reader.layout = cache.tiers, read_layout(layout)
        return cache

    def readers_of(self, index: int) -> list[SiteCache]:
        """The bound sites that read site `index`'s cache."""
        return [c for c in self.sites.values() if c.owner == index]

    def share(self, reader: int, owner: int) -> None:
        """Cross-layer KV sharing: site `reader` attends over site `owner`'s cache, and holds
        none of its own. Call before the reader is bound; the owner must be an earlier site
        that reads no other site's cache."""
        if reader <= owner:
            raise KVStoreError(f"KVStore.share: reader site {reader} must come after owner site {owner}")
        if owner in self._shared:
            raise KVStoreError(f"KVStore.share: owner site {owner} itself reads site {self._shared[owner]}; "
                               f"allowed: share site {self._shared[owner]} directly")
        bound = self.sites.get(reader)
        if self._shared.get(reader, owner) != owner or (bound is not None and bound.owner != owner):
            raise KVStoreError(f"KVStore.share: site {reader} is already bound to its own or another site's cache")
        self._shared[reader] = owner

    def _bind_shared(self, index: int) -> SiteCache:
        owner = self.sites.get(self._shared[index])
        if owner is None:
            raise KVStoreError(f"KVStore site {index}: shares site {self._shared[index]}'s cache, which is not bound yet")
        cache = SiteCache(index, owner.head_dim, owner.tiers, layout=read_layout(owner.layout), owner=owner.index)
        self.sites[index] = cache
        return cache

    # -- per-step inputs -----------------------------------------------------
    def step_positions(self, tokens: int) -> torch.Tensor:
        """The static [B, tokens] position buffer the op reads for steps of `tokens` tokens."""
        buf = self._step_positions.get(tokens)
        if buf is None:
            buf = torch.full((self.batch, tokens), -1, dtype=torch.int64, device=self.device)
            self._step_positions[tokens] = buf
        return buf

    # -- whole store ---------------------------------------------------------
    def owned_sites(self):
        """(index, cache) of the sites that hold their own memory (sharing readers left out)."""
        return [(i, c) for i, c in sorted(self.sites.items()) if c.owner is None]

    def reset(self) -> None:
        """Forget every sequence (in place)."""
        for _, cache in self.owned_sites():
            cache.reset()
        self.seen.zero_()

    def rollback_refusal(self) -> str | None:
        """Why `rollback` cannot be exact on this store (the first site and tier that
        cannot forget tokens exactly), or None when it can."""
        for index, cache in self.owned_sites():
            for name, tier in cache.tiers.items():
                if not tier.exact_rollback:
                    return f"site {index}'s {name!r} tier ({cache.layout}) cannot forget tokens exactly"
        return None

    def rollback(self, positions: torch.Tensor, *, check: bool = False) -> None:
        """Forget every token of sequence b at a position >= positions[b] (positions [B]
        int64, on the store's device): those slots become empty and seen[b] becomes
        min(seen[b], positions[b]). In place, on the device, no host sync, so a decode
        loop can roll back speculative tokens (runtime/vq_verify.py) and re-feed others.

        Exact only while nothing was evicted or overwritten: every site must still hold
        every token it was fed (capacity >= the longest sequence) and every tier must be
        able to forget exactly (`rollback_refusal`). check=True also verifies, with a host
        sync, that no token below the rollback point is missing.
        """
        if not isinstance(positions, torch.Tensor) or positions.shape != (self.batch,) or positions.dtype != torch.int64:
            got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise KVStoreError(f"KVStore.rollback positions: got {got}; allowed: an int64 tensor [{self.batch}] (one position per sequence)")
        why = self.rollback_refusal()
        if why:
            raise KVStoreError(f"KVStore.rollback: {why}; allowed: stores without eviction or KV quantization "
                               "(capacity >= the sequence length)")
        keep = positions.to(self.device)
        if check:
            self._check_complete(torch.minimum(self.seen, keep))
        for _, cache in self.owned_sites():
            for tier in cache.tiers.values():
                tier.forget_from(keep)
        torch.minimum(self.seen, keep, out=self.seen)

    def _check_complete(self, upto: torch.Tensor) -> None:
        """Raise unless every site holds all positions 0..upto[b]-1 of every sequence b (syncs)."""
        for index, cache in self.owned_sites():
            held = ((cache.slot_pos >= 0) & (cache.slot_pos.to(torch.int64) < upto[:, None, None])).sum(dim=-1)
            if bool((held < upto[:, None]).any()):
                raise KVStoreError(f"KVStore.rollback: site {index} (capacity {cache.capacity}) no longer holds every token "
                                   "before the rollback point (evicted or overwritten); allowed: capacity >= sequence length, no eviction")

    def nbytes(self) -> int:
        """Device bytes held by the caches of all sites; a tier several sites hold is counted once."""
        tiers = {id(t): t for _, c in self.owned_sites() for t in c.tiers.values()}
        return sum(t.nbytes() for t in tiers.values())

    def describe(self) -> str:
        caps = sorted({c.capacity for c in self.sites.values()})
        return f"KVStore {self.id}: batch {self.batch}, {len(self.sites)} sites, capacity {caps or self.capacity}, {self.nbytes() / 2**20:.1f} MiB"
