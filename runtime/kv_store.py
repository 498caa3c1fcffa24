"""The KV store: fixed-capacity, slot-based caches for every attention site.

DESIGN.md decision 2. One `KVStore` per generation setup (batch size, capacity,
dtype, device); one `SiteCache` per attention site, created when the `kv_runtime`
pass binds that site (so the store learns head counts from the graph's anatomy,
not from a model config):

    k, v      [B, Hkv, C, D]   slot buffers (C = capacity of that site)
    slot_pos  [B, Hkv, C] i32  true token position held by each slot; -1 = empty
    scores    [B, Hkv, C] f32  accumulated attention mass per slot (eviction policies)

and, shared by all sites of the store:

    seen               [B] i64   tokens seen so far per sequence (= next position)
    step_positions(T)  [B, T] i64 static buffer holding the positions of the T tokens
                                 of the step being run; negative = padding token

Why per-head slot positions: issue 6's per-head budgets must save real memory, so
two heads of one layer may hold different tokens in the same slot; everything that
reads the store masks by `slot_pos`, never by slot order.

Door for cross-layer sharing: `share(reader, owner)` makes a site read another
site's SiteCache (the reader's writes are then skipped by the op: see
`SiteCache.owner`). Door for KV quantization: a SiteCache carries its `dtype`; an
int8 tier adds scale buffers next to k/v without changing the rest of the API.

All updates happen in place on the device (the `slimfx::attention` op writes k/v,
slot_pos and scores; the generator advances `seen`), so a decode step has static
shapes and addresses and can be captured in a CUDA graph.
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
class SiteCache:
    """The slot buffers of one attention site (shapes in the module doc)."""

    index: int
    k: torch.Tensor
    v: torch.Tensor
    slot_pos: torch.Tensor
    scores: torch.Tensor
    owner: int | None = None  # set when this site reads another site's cache (cross-layer sharing)
    # Per-head budgets (DuoAttention): the site's kv heads split into two groups, each
    # with buffers of its own capacity, so a small group really holds fewer bytes.
    # `heads` are the kv-head indices this cache holds (None: all, in order);
    # `companion` holds the other group's buffers.
    heads: tuple | None = None
    companion: "SiteCache | None" = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def total_kv_heads(self) -> int:
        """Kv heads of the whole site, both head groups when per-head budgets split it."""
        return self.n_kv_heads + (self.companion.n_kv_heads if self.companion is not None else 0)

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        if self.owner is not None:
            return 0  # the owner holds the memory
        own = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos, self.scores))
        return own + (self.companion.nbytes() if self.companion is not None else 0)

    def reset(self) -> None:
        """Empty every slot (in place: addresses stay valid for captured graphs)."""
        self.slot_pos.fill_(-1)
        self.scores.zero_()
        if self.companion is not None:
            self.companion.reset()

    def occupancy(self) -> torch.Tensor:
        """Filled slots per (sequence, kv head), [B, Hkv] (a device tensor; reading it syncs)."""
        return (self.slot_pos >= 0).sum(dim=-1)


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
    overrides {site index: slots}. dtype/device: of the k/v buffers.
    """

    def __init__(self, batch: int, capacity: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", capacities: dict[int, int] | None = None, store_id: str | None = None):
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
        self.dtype = dtype
        self.device = torch.device(device)
        self.id = store_id or f"kvstore-{next(_IDS)}"
        self.sites: dict[int, SiteCache] = {}
        self.seen = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._step_positions: dict[int, torch.Tensor] = {}
        self._shared: dict[int, int] = {}  # reader site -> owner site
        # Options the attention op reads per call (eviction policies set them; issue 6).
        self.track_scores = False
        self.score_decay = 1.0
        register_store(self)

    # -- sites ---------------------------------------------------------------
    def capacity_of(self, index: int) -> int:
        return self.capacities.get(index, self.capacity)

    def site(self, index: int, n_kv_heads: int, head_dim: int) -> SiteCache:
        """The SiteCache of site `index`, allocated on first use (empty slots)."""
        cache = self.sites.get(index)
        if cache is not None:
            if (cache.total_kv_heads, cache.head_dim) != (n_kv_heads, head_dim):
                raise KVStoreError(
                    f"KVStore site {index}: already holds {cache.total_kv_heads} kv heads x {cache.head_dim}; "
                    f"asked for {n_kv_heads} x {head_dim} (one store serves one model)"
                )
            return cache
        if index in self._shared:
            return self._bind_shared(index)
        cap = self.capacity_of(index)
        shape = (self.batch, n_kv_heads, cap, head_dim)
        dev = self.device
        cache = SiteCache(
            index=index,
            k=torch.zeros(shape, dtype=self.dtype, device=dev),
            v=torch.zeros(shape, dtype=self.dtype, device=dev),
            slot_pos=torch.full(shape[:3], -1, dtype=torch.int32, device=dev),
            scores=torch.zeros(shape[:3], dtype=torch.float32, device=dev),
        )
        self.sites[index] = cache
        return cache

    def resize_site(self, index: int, capacity: int, heads: tuple | None = None) -> SiteCache:
        """Replace site `index`'s buffers by empty ones of `capacity` slots holding only the
        kv heads `heads` (default: all). Real memory: new tensors, the old ones are dropped
        once nothing references them. Graphs bound to the old buffers must be rebound."""
        old = self.sites[index]
        B, H, _, D = old.k.shape
        n_heads = H if heads is None else len(heads)
        dev = old.k.device
        new = SiteCache(
            index=index,
            k=torch.zeros(B, n_heads, capacity, D, dtype=old.k.dtype, device=dev),
            v=torch.zeros(B, n_heads, capacity, D, dtype=old.v.dtype, device=dev),
            slot_pos=torch.full((B, n_heads, capacity), -1, dtype=old.slot_pos.dtype, device=dev),
            scores=torch.zeros(B, n_heads, capacity, dtype=old.scores.dtype, device=dev),
            heads=None if heads is None else tuple(int(h) for h in heads),
        )
        self.sites[index] = new
        self.capacities[index] = capacity
        return new

    def share(self, reader: int, owner: int) -> None:
        """Cross-layer KV sharing: site `reader` attends over site `owner`'s cache.
        Call before the model is compiled; the owner must be an earlier site."""
        if reader <= owner:
            raise KVStoreError(f"KVStore.share: reader site {reader} must come after owner site {owner}")
        self._shared[reader] = owner

    def _bind_shared(self, index: int) -> SiteCache:
        owner = self.sites.get(self._shared[index])
        if owner is None:
            raise KVStoreError(f"KVStore site {index}: shares site {self._shared[index]}'s cache, which is not bound yet")
        cache = SiteCache(index, owner.k, owner.v, owner.slot_pos, owner.scores, owner=owner.index)
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
    def reset(self) -> None:
        """Forget every sequence (in place)."""
        for cache in self.sites.values():
            if cache.owner is None:
                cache.reset()
        self.seen.zero_()

    def rollback(self, positions: torch.Tensor, *, check: bool = False) -> None:
        """Forget every token of sequence b at a position >= positions[b] (positions [B]
        int64, on the store's device): those slots become empty and seen[b] becomes
        min(seen[b], positions[b]). In place, on the device, no host sync, so a decode
        loop can roll back speculative tokens (runtime/vq_verify.py) and re-feed others.

        Exact only while nothing was evicted or overwritten: every site must still hold
        every token it was fed (capacity >= the longest sequence, no eviction policy).
        Evicted tokens cannot come back and a policy's accumulated scores cannot be
        un-accumulated, so a store whose policy tracks scores refuses. check=True also
        verifies, with a host sync, that no token below the rollback point is missing.
        """
        if not isinstance(positions, torch.Tensor) or positions.shape != (self.batch,) or positions.dtype != torch.int64:
            got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise KVStoreError(f"KVStore.rollback positions: got {got}; allowed: an int64 tensor [{self.batch}] (one position per sequence)")
        if self.track_scores:
            raise KVStoreError("KVStore.rollback: this store's eviction policy tracks attention scores, which a rollback cannot "
                               "restore; allowed: stores without an eviction policy (capacity >= the sequence length)")
        tiered = [i for i, c in sorted(self.sites.items()) if type(c) is not SiteCache or c.companion is not None]
        if tiered:
            raise KVStoreError(f"KVStore.rollback: site {tiered[0]} keeps a second tier (DuoAttention's streaming heads or "
                               "MiKV's low-precision tokens) that a rollback does not restore; allowed: stores of plain sites")
        keep = positions.to(self.device)
        if check:
            self._check_complete(torch.minimum(self.seen, keep))
        for cache in self.sites.values():
            if cache.owner is not None:
                continue  # the owner site is rolled back once
            drop = cache.slot_pos.to(torch.int64) >= keep[:, None, None]
            cache.slot_pos.masked_fill_(drop, -1)
            cache.scores.masked_fill_(drop, 0.0)
        torch.minimum(self.seen, keep, out=self.seen)

    def _check_complete(self, upto: torch.Tensor) -> None:
        """Raise unless every site holds all positions 0..upto[b]-1 of every sequence b (syncs)."""
        for index, cache in sorted(self.sites.items()):
            held = ((cache.slot_pos >= 0) & (cache.slot_pos.to(torch.int64) < upto[:, None, None])).sum(dim=-1)
            if bool((held < upto[:, None]).any()):
                raise KVStoreError(f"KVStore.rollback: site {index} (capacity {cache.capacity}) no longer holds every token "
                                   "before the rollback point (evicted or overwritten); allowed: capacity >= sequence length, no eviction")

    def nbytes(self) -> int:
        """Device bytes held by the caches of all sites."""
        return sum(c.nbytes() for c in self.sites.values())

    def describe(self) -> str:
        caps = sorted({c.capacity for c in self.sites.values()})
        return f"KVStore {self.id}: batch {self.batch}, {len(self.sites)} sites, capacity {caps or self.capacity}, {self.nbytes() / 2**20:.1f} MiB"
