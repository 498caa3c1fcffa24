"""The `tidal` variant of `slimfx::attention` (runtime/attention_op.py): TidalDecode (Yang et
al. 2024, "Fast and Accurate LLM Decoding with Position Persistent Sparse Attention").
Every site keeps its whole cache; a few token selection layers choose, at each decode step,
the tokens the layers after them read. Lossy; it saves no memory.

    layout  tidal/select/<budget>   a token selection layer
            tidal/follow/<budget>   a layer reading the last selection layer's choice
    tiers   main:   k, v [B, Hkv, C, D], slot_pos [B, Hkv, C] -- the plain ring, whole
            chosen: slot_pos [B, Hq, K], K = min(budget - 1, C): the positions the
                    selection layer chose for each query head (-1 = none). The selection
                    site owns it; each following site holds the same Tier, so the buffer
                    is an input of its op node and the decode graph stays static.

- prefill (T > 1): exactly the plain variant, at every site.
- decode (T == 1), selection layer: the token is written, the query attends over every
  slot (exact), then each query head chooses the K earlier positions of highest q.k
  (the authors' code: per query head, top-k of the raw scores, the current token read
  besides, so `budget` counts it) and writes them to `chosen`.
- decode, following layer: the token is written, then each query head attends over its
  chosen positions and the current token only (codegen/kernels/gather_decode_attention.py:
  a chosen position is read where its slot still holds it).
- layers before the first selection layer are left plain (exact); the pass wires them.

What it saves is bandwidth, not memory: a following layer loads, per query head, only its
K chosen K/V rows and the current token's (the gather kernel on GPU; its PyTorch reference
gathers the same rows elsewhere), about (K + 1) * Hq rows against the C * Hkv a full
read loads. A selection layer still reads every slot, and then scores every slot again
for its top-k (`choose`, in PyTorch). The selection is recomputed at every decode step,
so rolling tokens back leaves nothing stale.
"""

from __future__ import annotations

import torch

from slimfx.codegen.kernels.gather_decode_attention import gather_decode_attention, gather_decode_attention_ref
from slimfx.runtime.attention_op import Plain, TierRead, Tiers, decode_read, layout_string, register_variant, write_tokens
from slimfx.runtime.kv_store import Tier

FIELDS = ("main.k", "main.v", "main.slot_pos", "chosen.slot_pos")
ROLES = ("select", "follow")
NAME = "tidaldecode"
# The authors' Llama-3-8B placement (32 layers): layers 0-1 full, layer 2 selects, layer 13 re-selects.
PAPER_FIRST, PAPER_RESELECT, PAPER_DEPTH = 2, 13, 32


def paper_layers(n_layers: int) -> list[int]:
    """The paper's selection layers scaled to a model of `n_layers` layers: the layer after
    two full-attention ones, and the re-selection layer at 13/32 of the depth."""
    first = min(PAPER_FIRST, n_layers - 1)
    again = round(PAPER_RESELECT * n_layers / PAPER_DEPTH)
    return [first, again] if first < again < n_layers else [first]


def tidal_layout(role: str, budget: int) -> str:
    return layout_string("tidal", role, budget)


def chosen_tier(batch: int, n_q_heads: int, budget: int, capacity: int, device) -> Tier:
    """The selection layer's buffer of chosen positions, empty."""
    slots = max(1, min(budget - 1, capacity))
    return Tier({"slot_pos": torch.full((batch, n_q_heads, slots), -1, dtype=torch.int32, device=device)})


def choose(q1: torch.Tensor, keys: torch.Tensor, slot_pos: torch.Tensor, q_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Per query head, the k held positions before q_pos of highest q.k ([B, Hq, k] int64 in
    no particular order, -1 where fewer are held). q1 [B, Hq, D]; keys [B, Hkv, C, D]; slot_pos [B, Hkv, C]."""
    B, Hq, D = q1.shape
    Hkv = keys.shape[1]
    # Scores in the cache's dtype (a GPU matmul accumulates in fp32 and rounds once; fp32
    # caches, as on CPU, score in fp32): a float32 copy of a 16-bit cache would read and
    # write the whole cache again at every step, which is what the following layers save.
    logits = torch.einsum("bhgd,bhcd->bhgc", q1.to(keys.dtype).view(B, Hkv, Hq // Hkv, D), keys)
    earlier = (slot_pos >= 0) & (slot_pos < q_pos.view(-1, 1, 1))
    logits = logits.masked_fill(~earlier[:, :, None, :], float("-inf"))
    top, idx = logits.topk(k, dim=-1, sorted=False)  # a set: the read does not depend on the order
    held = slot_pos[:, :, None, :].expand(B, Hkv, Hq // Hkv, -1).to(torch.int64)
    pos = torch.gather(held, 3, idx)
    return torch.where(torch.isfinite(top), pos, -1).reshape(B, Hq, k)


class Tidal:
    fields = FIELDS
    _plain = Plain()

    def __init__(self, role: str, budget: str):
        if role not in ROLES:
            raise ValueError(f"role {role!r}; allowed: {', '.join(ROLES)}")
        self.role, self.budget = role, int(budget)

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main = tiers["main"]
        if q.shape[2] > 1:
            return self._plain.run(q, k, v, positions, {"main": main}, scale, triton)
        write_tokens(k, v, positions, main["k"], main["v"], main["slot_pos"], triton)
        q_pos = positions[:, 0]
        if self.role == "select":
            out = decode_read(q, q_pos, [TierRead(main["k"], main["v"], main["slot_pos"])], scale, triton)
            chosen = tiers["chosen"]["slot_pos"]
            chosen.copy_(choose(q[:, :, 0], main["k"], main["slot_pos"], q_pos, chosen.shape[2]))
            return out
        # `choose` gives each head distinct positions, as the read requires.
        read = gather_decode_attention if triton else gather_decode_attention_ref
        return read(q, main["k"], main["v"], main["slot_pos"], tiers["chosen"]["slot_pos"], q_pos, scale)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        """A site reading this cache (cross-layer sharing) reads it whole: it is not a
        selection layer, and the choice it would follow may come from a later one."""
        return self._plain.read(q, positions, {"main": tiers["main"]}, scale, triton)


register_variant("tidal", Tidal)


# ----------------------------------------------------------------------------- the rewrite


def _n_q_heads(node) -> int:
    from slimfx.compiler.anatomy import shape_of

    return int(shape_of(node.args[0])[1])


def check_layers(layers: list[int], sites: dict, store, key: str) -> None:
    """ConfigError (one line) unless every selection layer is a global site of this graph
    holding its own cache."""
    from slimfx.compiler.config import ConfigError

    for layer in layers:
        cache = store.sites.get(layer) if layer in sites else None
        if cache is None:
            raise ConfigError(f"{key}: got {layers}; layer {layer} has no attention site here; allowed: layers of "
                              f"{sorted(sites)}")
        if cache.owner is not None or cache.layout.split("/")[0] not in ("plain", "tidal") or cache.layout.startswith("plain/"):
            raise ConfigError(f"{key}: got {layers}; layer {layer} is laid out as {cache.layout!r}"
                              f"{f' (it reads site {cache.owner})' if cache.owner is not None else ''}; allowed: a global layer "
                              "holding its own plain cache")


def rewrite_sites(gm, store, sites: dict, layers: list[int], budget_of, key: str) -> tuple[int, int, list[str]]:
    """Lay every site from the first selection layer on out as TidalDecode's (module doc):
    `layers` select (empty: paper_layers), each following site reads the chosen tier of the
    last selection layer before it. sites: index -> its slimfx::attention node; budget_of:
    a selection layer's budget. Returns (bytes saved, sites rewritten, notes)."""
    from slimfx.compiler.config import ConfigError
    from slimfx.passes._graph import relayout_site

    layers = layers or paper_layers(max(sites) + 1)
    check_layers(layers, sites, store, key)
    # The store's own count: a chosen tier several sites hold is one buffer (relayout_site counts it per site).
    before, rewritten, notes = store.nbytes(), 0, []
    for index in sorted(sites):
        cache = store.sites[index]
        if index < layers[0]:
            notes.append(f"site {index}: before the first selection layer ({layers[0]}), full attention")
            continue
        if cache.owner is not None or cache.layout.startswith("plain/") or cache.layout.split("/")[0] not in ("plain", "tidal"):
            notes.append(f"site {index}: laid out as {cache.layout!r}, left as it is (reads it whole)")
            continue
        select = max(layer for layer in layers if layer <= index)
        budget = budget_of(select)
        if budget >= cache.capacity:
            notes.append(f"site {index}: budget {budget} >= store capacity {cache.capacity}, every slot is read")
            continue
        if index == select:
            heads = _n_q_heads(sites[index])
            make = lambda c, h=heads, b=budget: {"main": c.tiers["main"], "chosen": chosen_tier(store.batch, h, b, c.capacity, c.k.device)}
            relayout_site(gm, store, index, tidal_layout("select", budget), make)
        else:
            chosen = store.sites[select].tiers.get("chosen")
            if chosen is None:
                notes.append(f"site {index}: its selection layer {select} reads every slot, so does it")
                continue
            if chosen.n_heads != _n_q_heads(sites[index]):
                raise ConfigError(f"{key}: site {index} has {_n_q_heads(sites[index])} query heads, its selection layer {select} "
                                  f"{chosen.n_heads}; allowed: selection layers with the query-head count of the layers after them")
            relayout_site(gm, store, index, tidal_layout("follow", budget), lambda c, t=chosen: {"main": c.tiers["main"], "chosen": t})
        rewritten += 1
    return before - store.nbytes(), rewritten, notes
