"""The `select` variant of `slimfx::attention` (runtime/attention_op.py): a site that keeps
its whole cache but lets each decode step read only part of it (TokenSelect, Wu et al.
2024, "Dynamic Token-Level KV Cache Selection"). Lossy; it saves no memory.

    layout  select/tokenselect/<n_sink>/<window>/<budget>/<vote>
    tiers   main: k, v [B, Hkv, C, D], slot_pos [B, Hkv, C] -- the plain ring, C = the
            site's full capacity, so nothing is ever evicted

- prefill (T > 1): exactly the plain variant (every prompt token attends to every
  earlier one; the paper's chunked-prefill selection is not applied).
- decode (T == 1): the token is written to its ring slot, then the query attends over
  `budget` slots only: the first `n_sink` positions, the `window` most recent (the
  current token included) and the `budget - n_sink - window` other slots with the
  highest head-soft-vote score. The score of a candidate slot is, per query head,
  softmax over the candidates of the raw q.k (no 1/sqrt(d): the reference code's
  `torch.softmax(q @ k)`), summed over the heads that vote: every query head of the
  layer (`vote` = layer, the paper's "head soft vote": one token set per layer) or the
  query heads sharing a kv head (`vote` = kv_head: one set per kv head, what a GQA read
  can use without repeating keys). A sequence with no more than `budget` tokens reads
  them all, exactly as the plain variant.

Paper defaults (its Llama-3-8B config: n_init 128, n_local 512, top_k 2048, i.e. 2688
tokens read): n_sink and window take the same shares of the budget (`SELECT_DEFAULTS`).

No bandwidth-saving kernel exists yet: the selection is applied by marking unselected
slots unreadable (slot position -1) in the read's position tensor, so the decode read
(PyTorch on CPU, the Triton decode kernel on CUDA) still loads every slot. Neither
memory nor time is saved; only the attention's result is that of the selected tokens.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from slimfx.passes.kv_eviction.policies import EvictionPolicy
from slimfx.runtime.attention_op import Plain, TierRead, Tiers, decode_read, layout_string, register_variant, write_tokens
from slimfx.runtime.kv_store import SiteCache, plain_tier

FIELDS = Plain.fields
SELECTORS = ("tokenselect",)
VOTES = ("layer", "kv_head")

# n_sink and window as shares of the budget, from the paper's 128 sinks + 512 recent of 2688 tokens read.
SELECT_DEFAULTS = {"tokenselect": (lambda budget: budget * 128 // 2688, lambda budget: budget * 512 // 2688)}


def resolve_sinks(name: str, budget: int, n_sink: int, window: int) -> tuple[int, int]:
    """(n_sink, window) with -1 replaced by the paper's share of `budget`."""
    paper_sink, paper_window = SELECT_DEFAULTS[name]
    return (paper_sink(budget) if n_sink < 0 else n_sink, paper_window(budget) if window < 0 else window)


class TokenSelect(EvictionPolicy):
    """The keep rule of EvictionPolicy (sinks + recent window + top priority), applied per
    decode step to choose which slots are read; priority is the current query's vote."""

    def __init__(self, budget: int, n_sink: int, window: int):
        super().__init__(budget, n_sink=n_sink, window=window, name="tokenselect")

    def priority(self, scores, slot_pos, seen):
        return scores


def check_options(budget: int, n_sink: int, window: int) -> None:
    """ConfigError (key without the pass prefix) unless budget >= n_sink + window + 1."""
    TokenSelect(budget, n_sink, window)


@lru_cache(maxsize=None)
def _policy(budget: int, n_sink: int, window: int) -> TokenSelect:
    return TokenSelect(budget, n_sink, window)


def select_layout(n_sink: int, window: int, budget: int, vote: str = "layer") -> str:
    return layout_string("select", "tokenselect", n_sink, window, budget, vote)


def select_site(batch: int, n_heads: int, capacity: int, head_dim: int, *, n_sink: int, window: int, budget: int,
                vote: str = "layer", dtype=torch.float32, device="cpu", index: int = 0) -> SiteCache:
    """A standalone site of this layout (empty), outside any store."""
    main = plain_tier(batch, n_heads, capacity, head_dim, dtype=dtype, device=device)
    return SiteCache(index, head_dim, {"main": main}, layout=select_layout(n_sink, window, budget, vote))


def vote_scores(q1: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, vote: str) -> torch.Tensor:
    """Head soft vote, [B, Hkv, C] f32: per query head softmax over the candidate slots of
    raw q.k, summed over the voting heads. q1 [B, Hq, D]; keys [B, Hkv, C, D];
    candidates [B, Hkv, C] bool."""
    B, Hq, D = q1.shape
    Hkv = keys.shape[1]
    logits = torch.einsum("bhgd,bhcd->bhgc", q1.float().view(B, Hkv, Hq // Hkv, D), keys.float())
    logits = logits.masked_fill(~candidates[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # no candidate: a row of -inf votes nothing
    votes = probs.sum(dim=2)
    return votes.sum(dim=1, keepdim=True).expand_as(votes) if vote == "layer" else votes


def selected_positions(q1, keys, slot_pos, q_pos, policy: TokenSelect, vote: str) -> torch.Tensor:
    """slot_pos with every slot the query does not read set to -1."""
    seen = q_pos + 1
    filled = (slot_pos >= 0) & (slot_pos <= q_pos.view(-1, 1, 1))
    candidates = filled & ~policy.protected(slot_pos, seen)
    votes = vote_scores(q1, keys, candidates, vote)
    keep = policy.keep_mask(votes, torch.where(filled, slot_pos, -1), seen)
    return torch.where(keep, slot_pos, -1)


class Select:
    fields = FIELDS
    _plain = Plain()

    def __init__(self, selector: str, n_sink: str, window: str, budget: str, vote: str):
        if selector not in SELECTORS:
            raise ValueError(f"selector {selector!r}; allowed: {', '.join(SELECTORS)}")
        if vote not in VOTES:
            raise ValueError(f"vote {vote!r}; allowed: {', '.join(VOTES)}")
        self.policy, self.vote = _policy(int(budget), int(n_sink), int(window)), vote

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        if q.shape[2] > 1:
            return self._plain.run(q, k, v, positions, tiers, scale, triton)
        main = tiers["main"]
        write_tokens(k, v, positions, main["k"], main["v"], main["slot_pos"], triton)
        return self._decode(q, positions, main, scale, triton)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        if q.shape[2] > 1:
            return self._plain.read(q, positions, tiers, scale, triton)
        return self._decode(q, positions, tiers["main"], scale, triton)

    def _decode(self, q, positions, main, scale, triton):
        q_pos = positions[:, 0]
        pos = selected_positions(q[:, :, 0], main["k"], main["slot_pos"], q_pos, self.policy, self.vote)
        return decode_read(q, q_pos, [TierRead(main["k"], main["v"], pos.to(main["slot_pos"].dtype))], scale, triton)


register_variant("select", Select)
