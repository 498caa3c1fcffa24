"""Self-speculative decoding: draft with blocks removed, verify with the whole model.

    cfg: [passes.layer_skip] mode = "speculative", blocks = [...] (or plan / target_speedup),
         draft_length = K, adaptive_draft = true
    tokens, stats = slimfx.runtime.generate(model, ids, config=cfg, max_new_tokens=128)

A round (device tensors only; the host reads a few counters once per round):
1. Draft: k decode steps of the draft graph (the model with the chosen blocks removed,
   runtime/skip_variants.py), each feeding the previous draft token. The draft's graph
   writes keys and values into the store for the blocks it runs, at the drafted
   positions; those entries are the draft's, not the full model's.
2. Verify: the store forgets every position from the round's start (KVStore.rollback), so
   it holds only tokens the full model computed; then one forward of the full model over
   K + 1 tokens: the round's first token, the k drafts, and K - k fillers (the last
   tokens of the draft buffer: causal attention keeps them from changing the logits of
   the tokens before them, and they are forgotten below). It writes every block's keys
   and values at those positions. One static shape (K + 1) for every k: one graph, one
   CUDA graph, no recompiles while k adapts.
3. Accept: greedy keeps the drafts equal to the full model's argmax and the full model's
   token after them (a correction, or a bonus token when all k agree). Sampling keeps
   draft x_j with probability min(1, p_j(x_j) / q_j(x_j)) and at the first rejection
   draws from normalise(max(0, p_j - q_j)) (or from p_k when every draft is kept): the
   speculative sampling rule (Leviathan et al. / Chen et al.), so every emitted token
   follows the full model's sampling distribution p (the same temperature, top-k, top-p).
4. Roll back past the kept tokens: the store forgets positions after the last kept one.

Exactness: greedy tokens are the full model's argmax given the kept prefix, computed in
one (K + 1)-token forward instead of single-token steps: the two matmul shapes may round
the last float bit differently, so an argmax flip needs two logits equal to that
precision. In float32 the tests find the tokens identical to the unmodified model's
generate; in bfloat16 such ties happen: on the default model (CPU, 2 prompts x 64 tokens)
one prompt's tokens first differed where the two candidates' bf16 logits were equal and
their float32 logits 0.041 apart (benchmarks/diag_speculative_rounding.py), and on the
H100 none of 8 runs of 128 tokens stayed identical to plain greedy. The store must hold
every token it was fed (capacity >= prompt + new tokens + K) and every tier must forget
exactly (`Tier.exact_rollback`): eviction and KV quantization are refused by name, as
are sliding-window rings (a ring of W slots would lose in-window tokens to the drafts).

Draft length: with acceptance rate a (the running share of drafts kept) and draft cost c
(the draft's share of the weight bytes a step reads: batch-1 decode is memory-bound, and
the verify forward of K + 1 tokens reads the weights once, like one step), a round of k
drafts emits (1 - a^(k+1)) / (1 - a) tokens for k c + 1 steps' time; each round takes the
k in 1..K that maximises that ratio (adaptive_draft = false: always K).
"""

from __future__ import annotations

import time

import torch

from slimfx.runtime.generate import argmax_last, draw, sampling_probs

# Weight of the newest round in the running acceptance rate.
_RATE_DECAY = 0.8


def best_draft_length(rate: float, cost: float, longest: int) -> int:
    """The k in 1..longest maximising expected tokens per round over its cost (module doc)."""
    a = min(max(rate, 0.0), 0.999)

    def gain(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (k * cost + 1)

    return max(range(1, longest + 1), key=lambda k: (gain(k), -k))


def accept_greedy(logits: torch.Tensor, drafted: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept drafts a [B], the round's tokens [B, K + 1]) for greedy decoding: logits
    [B, K + 1, V] of the full model, drafted [B, K] (only the first k count). The round's
    tokens are the full model's argmax: rows < a equal the drafts, row a follows them."""
    target = argmax_last(logits)
    K = drafted.shape[1]
    live = torch.arange(K, device=drafted.device)[None, :] < k
    ok = (target[:, :K] == drafted) & live
    return ok.int().cumprod(dim=1).sum(dim=1), target


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept drafts a [B], the round's tokens [B, K + 1]) by the speculative sampling rule:
    p [B, K + 1, V] the full model's sampling distributions, q [B, K, V] the draft's (the
    drafts were drawn from them), drafted [B, K] (only the first k count)."""
    B, K = drafted.shape
    live = torch.arange(K, device=drafted.device)[None, :] < k
    p_x = p[:, :K].gather(-1, drafted[..., None])[..., 0]
    q_x = q.gather(-1, drafted[..., None])[..., 0]
    ok = (torch.rand(B, K, device=p.device) * q_x < p_x) & live
    a = ok.int().cumprod(dim=1).sum(dim=1)
    V = p.shape[-1]
    p_a = p.gather(1, a.view(B, 1, 1).expand(B, 1, V))[:, 0]
    q_a = q.gather(1, a.clamp(max=K - 1).view(B, 1, 1).expand(B, 1, V))[:, 0]
    residual = (p_a - torch.where((a < k)[:, None], q_a, 0.0)).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)  # p == q: never rejected
    tokens = torch.cat([drafted, drafted[:, :1]], dim=1).scatter(1, a[:, None], draw(residual)[:, None])
    return a, tokens


class SpeculativeLoop:
    """Rounds of draft steps + one verification over a Generator's store (module doc)."""

    def __init__(self, gen, draft, verify, *, longest: int, adaptive: bool, sampling: tuple, eos, pad_id: int,
                 max_new: int, min_new: int, vocab: int, steps, cost):
        store = gen.store
        B, dev = store.batch, store.device
        self.gen, self.store, self.draft, self.verify, self.steps = gen, store, draft, verify, steps
        self.K, self.adaptive, self.sampling, self.cost = longest, adaptive, sampling, cost
        self.greedy = sampling[0] == 0.0
        self.eos, self.max_new, self.min_new = eos, max_new, min_new
        self.out = torch.full((B, max_new + 1), pad_id, dtype=torch.int64, device=dev)  # last column: tokens past the end
        self.n_out = torch.zeros(B, dtype=torch.int64, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.start = torch.zeros(B, dtype=torch.int64, device=dev)
        self.tok0 = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.drafted = torch.zeros(B, longest, dtype=torch.int64, device=dev)
        self.q = None if self.greedy else torch.zeros(B, longest, vocab, dtype=torch.float32, device=dev)
        self.ids = torch.zeros(B, longest + 1, dtype=torch.int64, device=dev)
        self.rows = torch.arange(longest + 1, device=dev)
        self.didx = torch.zeros(1, dtype=torch.int64, device=dev)
        self.k = torch.zeros(1, dtype=torch.int64, device=dev)
        self.counts = torch.zeros(2, dtype=torch.int64, device=dev)  # drafted, kept (sequences still running)
        self.rounds = 0
        self.lengths: dict[int, int] = {}

    def hold(self, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """logits [B, T, V] of the tokens to be emitted at indices first[b] + t, with EOS made
        impossible below min_new_tokens (as the plain loop's hold_eos)."""
        if not self.min_new or self.eos is None:
            return logits
        is_eos = torch.isin(torch.arange(logits.shape[-1], device=logits.device), self.eos)
        early = (first[:, None] + torch.arange(logits.shape[1], device=logits.device)) < self.min_new
        return logits.masked_fill(is_eos[None, None, :] & early[..., None], float("-inf"))

    # -- device steps (each capturable in a CUDA graph) -----------------------------------
    def emit_first(self, logits: torch.Tensor) -> None:
        """The token after the prompt, from the prefill's logits [B, V] (the full model's)."""
        logits = self.hold(logits[:, None], self.n_out)[:, 0]
        first = argmax_last(logits) if self.greedy else draw(sampling_probs(logits, *self.sampling))
        self.out[:, 0] = first
        self.n_out.fill_(1)
        self.gen.cur_tok.copy_(first[:, None])
        self._begin_round()
        self._update_done()

    def _begin_round(self) -> None:
        self.start.copy_(self.store.seen)
        self.tok0.copy_(self.gen.cur_tok)
        self.didx.zero_()

    def draft_step(self) -> None:
        pos = self.store.step_positions(1)
        pos.copy_(self.store.seen[:, None])
        logits = self.hold(self.draft(self.gen.model, self.gen.cur_tok, pos)[:, None], self.n_out + self.didx)[:, 0]
        if self.greedy:
            token = argmax_last(logits)
        else:
            q = sampling_probs(logits, *self.sampling)
            token = draw(q)
            self.q.index_copy_(1, self.didx, q[:, None])
        self.drafted.index_copy_(1, self.didx, token[:, None])
        self.gen.cur_tok.copy_(token[:, None])
        self.store.seen.add_(1)
        self.didx.add_(1)

    def verify_step(self) -> None:
        store, K = self.store, self.K
        store.rollback(self.start)  # the drafts' keys and values go: the store holds the full model's tokens only
        self.ids[:, :1].copy_(self.tok0)
        self.ids[:, 1:].copy_(self.drafted)
        pos = store.step_positions(K + 1)
        pos.copy_(self.start[:, None] + self.rows)
        logits = self.hold(self.verify(self.gen.model, self.ids, pos), self.n_out)
        if self.greedy:
            a, tokens = accept_greedy(logits, self.drafted, self.k)
        else:
            a, tokens = accept_sampled(sampling_probs(logits, *self.sampling), self.q, self.drafted, self.k)
        last = torch.where(self.done, -1, torch.minimum(a, self.max_new - 1 - self.n_out))
        col = torch.where(self.rows[None, :] <= last[:, None], self.n_out[:, None] + self.rows, self.max_new)
        self.out.scatter_(1, col, tokens)
        running = (~self.done).long()
        self.counts.add_(torch.stack([(running * self.k).sum(), (running * a).sum()]))
        self.n_out.add_(last + 1)
        kept_to = self.start + last + 1
        store.rollback(kept_to)  # positions after the last kept token go
        store.seen.copy_(kept_to)
        cur = tokens.gather(1, last.clamp(min=0)[:, None])
        self.gen.cur_tok.copy_(torch.where(last[:, None] >= 0, cur, self.tok0))
        self._update_done()
        self._begin_round()

    def _update_done(self) -> None:
        full = self.n_out >= self.max_new
        if self.eos is not None:
            cols = torch.arange(self.max_new, device=self.out.device)[None, :]
            full |= (torch.isin(self.out[:, :self.max_new], self.eos) & (cols < self.n_out[:, None])).any(dim=1)
        self.done.copy_(full)

    # -- the host loop --------------------------------------------------------------------
    def run(self, callback=None) -> dict:
        rate, drafted_w, kept_w = 0.0, 0.0, 0.0
        before = torch.zeros(2, dtype=torch.int64)
        streamed, warm, last_out = 0, False, 0
        timed = {"rounds": 0, "s": 0.0, "tokens": 0}  # rounds that ran warm: no compile, warm-up or capture
        clock = time.perf_counter()
        while True:
            state = torch.cat([self.n_out, self.done.long(), self.counts]).cpu()  # the one sync per round
            B = self.store.batch
            n_out, done, counts = state[:B], state[B:2 * B].bool(), state[2 * B:]
            now = time.perf_counter()
            if warm:
                timed["rounds"] += 1
                timed["s"] += now - clock
                timed["tokens"] += int(n_out.sum()) - last_out
            clock, last_out = now, int(n_out.sum())
            if callback is not None and int(n_out.min()) > streamed:
                upto = min(int(n_out.min()), self.max_new)
                callback(self.out[:, streamed:upto].cpu(), streamed)
                streamed = upto
            new = counts - before
            before = counts
            if new[0] > 0:
                drafted_w = _RATE_DECAY * drafted_w + float(new[0])
                kept_w = _RATE_DECAY * kept_w + float(new[1])
                rate = kept_w / drafted_w
            if bool(done.all()):
                break
            left = int((self.max_new - n_out[~done]).max())
            k = best_draft_length(rate, self.cost(), self.K) if self.adaptive and self.rounds else self.K
            k = max(0, min(k, left - 1))
            warm = all([self.steps.run("draft", self.draft_step) for _ in range(k)])
            self.k.fill_(k)
            warm = self.steps.run("verify", self.verify_step) and warm
            self.lengths[k] = self.lengths.get(k, 0) + 1
            self.rounds += 1
        if callback is not None and streamed < self.max_new:
            callback(self.out[:, streamed:self.max_new].cpu(), streamed)
        drafted, kept = (int(c) for c in before)
        per_seq = timed["tokens"] / self.store.batch
        return {"rounds": self.rounds, "drafted": drafted, "accepted": kept,
                "acceptance_rate": kept / drafted if drafted else float("nan"),
                "draft_lengths": dict(sorted(self.lengths.items())), "timed_rounds": timed["rounds"],
                "timed_s": timed["s"], "timed_tokens": timed["tokens"],
                "ms_per_round": 1e3 * timed["s"] / timed["rounds"] if timed["rounds"] else float("nan"),
                "ms_per_token": 1e3 * timed["s"] / per_seq if per_seq else float("nan")}

    def tokens(self, pad_id: int) -> torch.Tensor:
        """[B, max_new] on CPU; after a sequence's first EOS, pad_id."""
        out = self.out[:, :self.max_new].cpu()
        if self.eos is not None:
            hit = torch.isin(out, self.eos.cpu()).int()
            out = out.masked_fill((hit.cumsum(dim=1) - hit) > 0, pad_id)
        return out
