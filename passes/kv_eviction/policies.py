"""KV-cache eviction policies: which slots of a fixed-budget store to keep.

Every policy shares the mechanics in `EvictionPolicy`: sinks (the first `n_sink`
positions) and the recent window (the last `window` positions seen) are always kept,
and the rest of the budget goes to the slots the policy ranks highest. A policy
implements `priority`, which ranks the slots; policies that learn from attention set
`decay`, the factor the fused attention kernel applies to each slot's accumulated mass
before adding the current step's (scores = decay * scores + mass), and may override
`prefill_scores`, how a prompt chunk scores every key.

Each policy's rule as its paper states it, with the paper's defaults (`PAPER_DEFAULTS`:
what `n_sink` / `window` -1 resolves to; B is the budget):

| policy    | prefill: a prompt token's score               | decode: the slot freed       | sinks / recent window |
| --------- | --------------------------------------------- | ---------------------------- | --------------------- |
| streaming | its position                                  | oldest non-sink              | 4 / the rest          |
| h2o       | attention mass summed over every prompt query | least accumulated mass       | 0 / B/2 (heavy = recent ratio) |
| h2o, mass "mean" | that sum / the queries that saw the token (kvpress's ObservedAttentionPress) | least mean mass | 0 / B/2 |
| a2sf      | mass summed with weight alpha^(T-1-t)         | least forgetting-factor sum  | 0 / B/2 (H2O's split) |
| tova      | the last prompt query's attention, mean over heads | least attention of the current query, mean over heads | 0 / 0 |
| keyformer | softmax((logits + Gumbel) / tau) summed over queries | least accumulated mass (*) | 0 / 30% of B (paper: 20-30%) |
| snapkv    | last `obs_window` queries' attention, max-pooled (7) over keys, mean over the GQA group | lowest prefill score (**) | 0 / obs_window (32) |
| duo       | streaming heads as streaming; retrieval heads keep all (duo_op.py) | oldest non-sink | 4 / the rest |
| d2o       | as h2o, and each evicted token merged into its most similar kept key (***) | as h2o, merged likewise | 4 / B/2 |

(*) Keyformer's decode steps add the kernel's plain softmax mass: the fused decode kernel
has no per-step Gumbel noise or temperature schedule. (**) SnapKV's paper keeps every
generated token; in a fixed-budget store generated tokens outside the recent window go
first (SCOPE's `decode_budget` gives them slots of their own).
A2SF's alpha is tuned per model in its paper; 0.95 here. (***) D2O's token level: the
keep rule is H2O's; an evicted token whose key's cosine similarity to its nearest kept
key reaches a moving-average threshold is merged into that kept token instead of being
dropped (eviction_op.merge_evicted). Its layer level (budgets by attention density) is a
calibrated per-layer split of the total budget (layer_budgets.py). The 4 sinks and the
equal heavy/recent split are the authors' code's (first 4 tokens forced kept, hh_ratio =
recent_ratio).

"Per head": H2O, A2SF, Keyformer and SnapKV keep a set per kv head (the mass of the
query heads sharing a kv head is summed); TOVA keeps one set per layer.
Decode order: the slot is freed by the previous query's scores, then the new token
is written; with TOVA this is exactly the paper's "attend, then drop the least
attended" with the budget counting the current token.

Layouts (those of runtime/kv_store.py's SiteCache): priority, scores and slot_pos
are [B, Hkv, C]; `seen` is [B] (tokens seen so far per sequence). Everything here is
tensor code without host synchronisation, so it can run inside a captured decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimfx.compiler.config import ConfigError

NEG_INF = float("-inf")


@dataclass
class EvictionPolicy:
    """Keep sinks + recent window + the top-priority rest, within `budget` slots."""

    budget: int
    n_sink: int = 4
    window: int = 64
    name: str = "base"
    decay: float | None = None  # None: the policy needs no attention scores
    merges = False  # True: evicted tokens may be merged into kept ones (D2O)
    # The decode-time victim rule of the fused write kernel (codegen/kernels/evict_write.py)
    # that equals `priority`: "score", "position" or "mean"; None: the torch path.
    fused_priority = None

    def __post_init__(self):
        self.check_budget()

    @property
    def needs_scores(self) -> bool:
        return self.decay is not None

    def check_budget(self, where: str = "budget") -> None:
        minimum = self.n_sink + self.window + 1
        if self.budget < minimum:
            raise ConfigError(
                f"{where}: got {self.budget}; allowed: >= {minimum} for policy {self.name!r} "
                f"(n_sink {self.n_sink} + window {self.window} + 1 slot to choose)"
            )

    # -- the one method a policy implements ---------------------------------
    def priority(self, scores: torch.Tensor, slot_pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Rank of every slot, [B, Hkv, C] float: higher is kept first."""
        raise NotImplementedError

    def prefill_scores(self, q, q_pos, keys, k_pos, scores, scale: float) -> torch.Tensor:
        """The scores of every key after a prefill chunk, [B, Hkv, N]: the decode-time rule
        scores = decay * scores + mass applied query by query over the chunk, so a prompt
        ranks its tokens exactly as if it had been fed one token at a time (H2O sums every
        query's mass, A2SF weights query t by alpha^(T-1-t), TOVA keeps only the last
        query's). q [B, Hq, T, D]; keys [B, Hkv, N, D] (the store's slots, then the chunk);
        q_pos [B, T] and k_pos [B, Hkv, N] true positions (negative: padding / empty);
        scores [B, Hkv, C <= N], the slots' scores before the chunk."""
        B, Hkv, N = k_pos.shape
        merged = torch.cat([scores, scores.new_zeros(B, Hkv, N - scores.shape[2])], dim=2)
        if not self.needs_scores:
            return merged
        T = q.shape[2]
        return merged * self.decay**T + prefill_key_mass(q, q_pos, keys, k_pos, scale, self.decay).to(merged.dtype)

    # -- mechanics shared by every policy -----------------------------------
    def protected(self, slot_pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Slots that are always kept: sinks and the recent window, [B, Hkv, C] bool."""
        filled = slot_pos >= 0
        recent = slot_pos >= (seen.view(-1, 1, 1) - self.window)
        return filled & ((slot_pos < self.n_sink) | recent)

    def keep_mask(self, scores: torch.Tensor, slot_pos: torch.Tensor, seen: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """Slots to keep, [B, Hkv, C] bool: protected ones, then the highest-priority
        candidates until `budget` slots are kept (ties broken by lower slot index)."""
        budget = self.budget if budget is None else budget
        filled = slot_pos >= 0
        prot = self.protected(slot_pos, seen)
        cand = filled & ~prot
        room = (budget - prot.sum(-1, keepdim=True)).clamp_min(0)
        prio = torch.where(cand, self.priority(scores, slot_pos, seen).float(), NEG_INF)
        order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return prot | (cand & (rank < room))

    def victim_slots(self, scores: torch.Tensor, slot_pos: torch.Tensor, seen: torch.Tensor, n_new: int) -> torch.Tensor:
        """Slots the next `n_new` tokens are written to, [B, Hkv, n_new] int64: empty slots
        first, then the lowest-priority unprotected ones. Requires n_new <= C - n_sink - window."""
        filled = slot_pos >= 0
        prot = self.protected(slot_pos, seen)
        prio = self.priority(scores, slot_pos, seen).float()
        # Empty slots cost nothing, protected ones are never chosen.
        cost = torch.where(~filled, NEG_INF, torch.where(prot, float("inf"), prio))
        if n_new == 1:  # a decode step: argmin (first index of the minimum) is the stable sort's first, in one kernel
            return cost.argmin(dim=-1, keepdim=True)
        return torch.sort(cost, dim=-1, stable=True).indices[..., :n_new]

    def compact(self, k, v, scores, slot_pos, seen, budget: int | None = None, keep: torch.Tensor | None = None):
        """Gather the kept slots of [B, Hkv, C(, D)] buffers into the first `budget` slots.

        Returns new (k, v, scores, slot_pos) of capacity min(budget, C); slots past the kept
        count are empty (slot_pos -1). Used after a prefill that saw more than the budget.
        `keep`: keep_mask's answer when the caller already has it.
        """
        budget = self.budget if budget is None else budget
        keep = self.keep_mask(scores, slot_pos, seen, budget) if keep is None else keep
        # Kept slots first (stable: in slot order), then the rest.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :budget]
        kept = torch.gather(keep, -1, order)
        gather4 = lambda t: torch.gather(t, 2, order[..., None].expand(*order.shape, t.shape[-1]))
        new_pos = torch.where(kept, torch.gather(slot_pos, -1, order), -1)
        new_scores = torch.where(kept, torch.gather(scores, -1, order), 0.0)
        return gather4(k), gather4(v), new_scores, new_pos


class StreamingLLM(EvictionPolicy):
    """Sinks + recent window; the oldest non-sink token goes first (StreamingLLM)."""

    fused_priority = "position"

    def __init__(self, budget, n_sink=4, window=64, **_):
        super().__init__(budget, n_sink, window, "streaming", None)

    def priority(self, scores, slot_pos, seen):
        return slot_pos.float()


class H2O(EvictionPolicy):
    """Heavy hitters: accumulated attention mass over every query seen (H2O). With
    `mean`, the mass divided by the number of queries that have seen the token (seen -
    its position): the rule of kvpress's ObservedAttentionPress, which does not favour
    early tokens for having been seen by more queries."""

    def __init__(self, budget, n_sink=4, window=64, mean=False, **_):
        super().__init__(budget, n_sink, window, "h2o", 1.0)
        self.mean = bool(mean)
        self.fused_priority = "mean" if self.mean else "score"

    def priority(self, scores, slot_pos, seen):
        if self.mean:
            return scores / (seen.view(-1, 1, 1) - slot_pos).clamp_min(1).to(scores.dtype)
        return scores


class A2SF(EvictionPolicy):
    """Accumulated mass with a forgetting factor: A_k = sum_q alpha^(n-q) S_qk (A2SF).
    The decay is applied by the attention kernel; ranking is by the decayed sum."""

    fused_priority = "score"

    def __init__(self, budget, n_sink=4, window=64, alpha=0.95, **_):
        super().__init__(budget, n_sink, window, "a2sf", float(alpha))

    def priority(self, scores, slot_pos, seen):
        return scores


class TOVA(EvictionPolicy):
    """Current query's attention (decay 0), averaged over the kv heads so that every
    head of a layer keeps the same tokens (TOVA's one index set per layer)."""

    def __init__(self, budget, n_sink=4, window=64, **_):
        super().__init__(budget, n_sink, window, "tova", 0.0)

    def priority(self, scores, slot_pos, seen):
        return scores.mean(dim=1, keepdim=True).expand_as(scores)


class Keyformer(EvictionPolicy):
    """Key tokens by an accumulated Gumbel-regularised score (Keyformer): each query adds
    softmax((logits + g) / tau) over the keys, g Gumbel noise fixed per (query position,
    key position, seed), so the ranking is deterministic and the same on every device.
    Decode steps add the kernel's plain mass (see the module table)."""

    def __init__(self, budget, n_sink=4, window=64, tau=1.0, seed=0, **_):
        super().__init__(budget, n_sink, window, "keyformer", 1.0)
        self.tau, self.seed = float(tau), int(seed)

    def priority(self, scores, slot_pos, seen):
        return scores

    def prefill_scores(self, q, q_pos, keys, k_pos, scores, scale: float) -> torch.Tensor:
        B, Hkv, N = k_pos.shape
        merged = torch.cat([scores, scores.new_zeros(B, Hkv, N - scores.shape[2])], dim=2)
        return merged + prefill_key_mass(q, q_pos, keys, k_pos, scale, 1.0, noise=self.noise, tau=self.tau).to(merged.dtype)

    def noise(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Gumbel noise [B, Hkv, T, N] for queries q_pos [B, T] and keys k_pos [B, Hkv, N]."""
        pair = q_pos[:, None, :, None].clamp_min(0) * 1_000_003 + k_pos[:, :, None, :].clamp_min(0)
        u = uniform_hash(pair, self.seed).clamp(1e-6, 1 - 1e-6)
        return -torch.log(-torch.log(u))


def uniform_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform draw in (0, 1) per position, float32, the same on every device: integer
    mixing (exact everywhere) rather than a float sine hash, whose last-ulp differences
    between CPU and CUDA sin() would reorder Keyformer's ranking."""
    mask = 0xFFFFFFFF
    h = (positions.to(torch.int64) * 0x61C88647 + (seed * 0x7FEB352D + 0x165667B1)) & mask
    for shift, mul in ((16, 0x45D9F3B), (16, 0x45D9F3B), (16, 1)):  # 32-bit avalanche rounds
        h = ((h ^ (h >> shift)) * mul) & mask
    return (h.to(torch.float64) + 0.5).div(2.0 ** 32).to(torch.float32)


class SnapKV(EvictionPolicy):
    """Prefill-time selection from the attention of the last `obs_window` prompt queries,
    max-pooled over neighbouring keys (kernel `pool`) and averaged over the GQA group.
    `snapkv_scores` computes the scores; decode then keeps the prefill selection and
    slides the recent window (priority: prefill score, new tokens are protected)."""

    def __init__(self, budget, n_sink=4, window=64, obs_window=32, pool=7, **_):
        super().__init__(budget, n_sink, window, "snapkv", None)
        self.obs_window, self.pool = int(obs_window), int(pool)

    def priority(self, scores, slot_pos, seen):
        # Prompt tokens by their prefill score (> 0: a softmax mass); generated tokens (score
        # 0) below every prompt token, the oldest first.
        return torch.where(scores > 0, scores, -1.0 / (slot_pos.float() + 2.0))

    def prefill_scores(self, q, q_pos, keys, k_pos, scores, scale: float) -> torch.Tensor:
        return snapkv_scores(q, keys, self.obs_window, self.pool, q_pos, k_pos).masked_fill(k_pos < 0, 0.0)


class DuoAttention(EvictionPolicy):
    """DuoAttention's streaming heads: sinks + recent window, like StreamingLLM. The
    retrieval heads (calibrated by `slimfx calibrate duo-heads`) keep a full store of
    their own; duo_op.py runs the two head groups of a site side by side."""

    fused_priority = "position"

    def __init__(self, budget, n_sink=4, window=64, **_):
        super().__init__(budget, n_sink, window, "duo", None)

    def priority(self, scores, slot_pos, seen):
        return slot_pos.float()


class D2O(EvictionPolicy):
    """H2O's accumulated attention mass and recent window; what it evicts is merged, not
    dropped, when similar enough to a kept token (`merges`: the evict op runs
    eviction_op.merge_evicted). `ema`: the weight of the previous merge threshold in its
    moving average."""

    merges = True

    def __init__(self, budget, n_sink=4, window=64, ema=0.5, **_):
        super().__init__(budget, n_sink, window, "d2o", 1.0)
        self.ema = float(ema)

    def priority(self, scores, slot_pos, seen):
        return scores


def prefill_key_mass(q, q_pos, keys, k_pos, scale: float, decay: float = 1.0, noise=None, tau: float = 1.0) -> torch.Tensor:
    """Attention mass every key receives from a chunk's queries, query t weighted by
    decay^(T-1-t) (the last query by 1; decay 0 keeps only the last), summed over the GQA
    group: [B, Hkv, N]. The same softmax as the prefill attention, recomputed: prefill
    happens once per prompt, so the second pass costs far less than decoding.
    `noise(q_pos, k_pos)` -> [B, Hkv, T, N] is added to the logits, which are then divided
    by `tau` (Keyformer's regularised score)."""
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    qf = q.float().view(B, Hkv, Hq // Hkv, T, D)
    logits = torch.einsum("bhgtd,bhnd->bhgtn", qf, keys.float()) * scale
    if noise is not None:
        logits = (logits + noise(q_pos, k_pos)[:, :, None]) / tau
    visible = (k_pos.view(B, Hkv, 1, 1, N) >= 0) & (k_pos.view(B, Hkv, 1, 1, N) <= q_pos.view(B, 1, 1, T, 1))
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    weights = torch.pow(torch.full((T,), float(decay), device=q.device), torch.arange(T - 1, -1, -1, device=q.device, dtype=torch.float32))
    return torch.einsum("bhgtn,t->bhn", probs, weights)


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, obs_window: int, pool: int, q_pos=None, k_pos=None) -> torch.Tensor:
    """SnapKV scores of every key, [B, Hkv, N].

    q [B, Hq, T, D], k [B, Hkv, N, D] (RoPE applied); q_pos [B, T] and k_pos [B, Hkv, N]
    are true positions (default: 0..T-1 and 0..N-1; negative = padding/empty). The last
    `obs_window` queries' causal softmax attention is summed per key, averaged over each
    GQA group, then max-pooled over `pool` neighbouring keys so clusters of context survive.
    """
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if q_pos is None:
        q_pos = torch.arange(T, device=q.device).expand(B, T)
    if k_pos is None:
        k_pos = torch.arange(N, device=q.device).expand(B, Hkv, N)
    w = min(obs_window, T)
    kk = k.repeat_interleave(Hq // Hkv, dim=1)
    logits = (q[:, :, -w:].float() @ kk.float().transpose(-1, -2)) / D**0.5  # [B, Hq, w, N]
    kp = k_pos.repeat_interleave(Hq // Hkv, dim=1)[:, :, None, :]
    qp = q_pos[:, None, -w:, None]
    logits = logits.masked_fill((kp < 0) | (kp > qp), NEG_INF)
    mass = logits.softmax(-1).nan_to_num(0.0).sum(2)  # [B, Hq, N]
    mass = mass.view(B, Hkv, Hq // Hkv, N).mean(2)
    # The paper pools only the keys before the observation window (those it selects from);
    # masses are >= 0, so a zero there pools like the padding would.
    in_window = k_pos >= q_pos[:, -w:].clamp_min(0).amin(dim=1).view(B, 1, 1)
    # Neighbours are neighbouring positions, whatever slots the store put them in (empty
    # slots and padding sort first, with mass 0).
    order = k_pos.argsort(dim=-1, stable=True)
    by_pos = torch.gather(mass.masked_fill(in_window, 0.0), -1, order)
    pooled = torch.empty_like(mass).scatter_(-1, order, F.max_pool1d(by_pos, kernel_size=pool, stride=1, padding=pool // 2)[..., :N])
    return torch.where(in_window, mass, pooled)


POLICIES = {"streaming": StreamingLLM, "h2o": H2O, "a2sf": A2SF, "tova": TOVA, "keyformer": Keyformer, "snapkv": SnapKV, "duo": DuoAttention,
            "d2o": D2O}


# The papers' sinks and recent windows, (n_sink, window(budget, param)): what the options'
# -1 resolves to. Streaming and duo rank by position, so the most recent tokens fill
# whatever the sinks leave (a window of 0 loses nothing).
PAPER_DEFAULTS = {
    "streaming": (4, lambda budget, param: 0),
    "h2o": (0, lambda budget, param: budget // 2),
    "a2sf": (0, lambda budget, param: budget // 2),
    "tova": (0, lambda budget, param: 0),
    "keyformer": (0, lambda budget, param: round(0.3 * budget)),
    "snapkv": (0, lambda budget, param: int(param) if param else 32),
    "duo": (4, lambda budget, param: 0),
    "d2o": (4, lambda budget, param: budget // 2),
}


def check_name(name: str) -> None:
    if name not in POLICIES:
        raise ConfigError(f"policy: got {name!r}; allowed: one of {', '.join(POLICIES)}")


def resolve_sinks(name: str, budget: int, n_sink: int | None = None, window: int | None = None, param: float = 0.0) -> tuple[int, int]:
    """(n_sink, window) with None or -1 replaced by the policy's paper default."""
    check_name(name)
    paper_sink, paper_window = PAPER_DEFAULTS[name]
    n_sink = paper_sink if n_sink is None or n_sink < 0 else n_sink
    window = paper_window(budget, param) if window is None or window < 0 else window
    return n_sink, window


def make_policy(name: str, budget: int, n_sink: int | None = None, window: int | None = None, **options) -> EvictionPolicy:
    """Policy `name` keeping `budget` slots; n_sink / window None or -1: the paper's."""
    param = options.get("obs_window", 0.0) if name == "snapkv" else 0.0
    n_sink, window = resolve_sinks(name, budget, n_sink, window, param)
    return POLICIES[name](budget, n_sink=n_sink, window=window, **options)
