"""Greedy decoding with the deferred-verification VQ head: exact tokens, the full LM head
read once per k steps instead of every step.

    from slimfx.runtime.vq_verify import generate_verified
    tokens, stats = generate_verified(model, input_ids, config=cfg, max_new_tokens=128)

`cfg` runs the vq_logits pass with mode = "exact", verify = "deferred" and
verify_every = k (and no KV eviction: a rollback needs every token still in the store).

How a round works (all device tensors; the host reads two small counters per round):
1. k decode steps through the compiled model (Generator.decode_step). The armed head op
   emits its probed candidate when the bound does not prove, and leaves the step's
   hidden state in a buffer; the loop stashes it with the candidate and the position at
   which the candidate will be fed.
2. Verification: one [k*B, H] x [H, V] matmul with the full head weight and an argmax.
   Per sequence, the first row m whose candidate differs from the full head's token:
   rows < m are kept (they were the full head's tokens), row m is replaced by the full
   head's token, rows > m are discarded (computed from a wrong token).
3. Rollback: the KV store forgets every position from where row m's token is fed
   (KVStore.rollback), and decoding continues from that token.

The tokens are therefore the full head's greedy tokens, computed by one batched GEMM
instead of per-step GEMVs (rounding of the two GEMM shapes may differ in the last f32
bit; an argmax flip needs two logits equal to that precision). Greedy only: sampling
from the candidates would not follow the full head's distribution.

Routes are counted on the device: slimfx.runtime.vq_head.route_counts() (bound,
accepted, corrected, discarded, rounds; the prefill token takes the unarmed op's route,
bound or fallback).
"""

from __future__ import annotations

import time

import torch

from slimfx.compiler.config import ConfigError
from slimfx.runtime import vq_head as rt
from slimfx.runtime.generate import GenerateError, GenerateOutput, get_generator, padded_prompt_length, prompt_lengths, sync_device
from slimfx.runtime.kv_store import KVStoreError

_GREEDY = (0.0, 0, 1.0)


def _deferred_options(config) -> tuple[dict, object]:
    """The vq_logits options of `config` (validated), which must ask for deferred verification."""
    from slimfx.compiler.config import load_config

    if config is None:
        raise ConfigError("generate_verified: config is required; allowed: a config whose pipeline runs "
                          "vq_logits with passes.vq_logits.mode = 'exact' and passes.vq_logits.verify = 'deferred'")
    cfg = load_config(config)
    raw = cfg.to_dict()
    pipeline = raw["pipelines"].get(raw["compile"]["pipeline"], [])
    opts = raw["passes"].get("vq_logits", {})
    if "vq_logits" not in pipeline:
        raise ConfigError(f"compile.pipeline {raw['compile']['pipeline']!r} does not run vq_logits; "
                          "allowed: a pipeline containing vq_logits (verify = 'deferred')")
    if opts.get("mode") != "exact" or opts.get("verify") != "deferred":
        raise ConfigError(f"passes.vq_logits.verify: got mode={opts.get('mode')!r}, verify={opts.get('verify')!r}; "
                          "allowed for generate_verified: mode = 'exact' with verify = 'deferred'")
    if "kv_eviction" in pipeline:
        raise ConfigError("compile.pipeline runs kv_eviction; allowed with verify = 'deferred': no eviction "
                          "(a KV rollback needs every token still in the store)")
    return opts, cfg


class _Round:
    """The stash of one verification round: per row s (decode step) and sequence b."""

    def __init__(self, every: int, batch: int, hidden: int, dtype, device):
        self.hidden = torch.zeros(every, batch, hidden, dtype=dtype, device=device)
        self.proved = torch.zeros(every, batch, dtype=torch.bool, device=device)
        self.feed_pos = torch.zeros(every, batch, dtype=torch.int64, device=device)  # where the row's token is fed
        self.cand = torch.zeros(batch, every, dtype=torch.int64, device=device)  # Generator.out layout [B, k]


class VerifiedLoop:
    """Rounds of k armed decode steps + one batched verification (module doc)."""

    def __init__(self, gen, head: rt.DeferredHead, max_new: int, pad_id: int, eos: torch.Tensor | None):
        store = gen.store
        self.gen, self.head, self.store = gen, head, store
        self.max_new, self.pad_id, self.eos = max_new, pad_id, eos
        B, dev = store.batch, store.device
        self.last_hidden, self.last_proved = head.last_buffers(B)
        self.round = _Round(head.every, B, head.weight.shape[1], head.weight.dtype, dev)
        self.out = torch.full((B, max_new + 1), pad_id, dtype=torch.int64, device=dev)  # last column: writes to drop
        self.n_out = torch.zeros(B, dtype=torch.int64, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)

    def emit_first(self, logits: torch.Tensor) -> None:
        """The prefill token (already exact: the unarmed op proved it or ran the full head)."""
        first = logits.argmax(dim=-1)
        self.out[:, 0] = first
        self.n_out.fill_(1)
        self.gen.cur_tok.copy_(first[:, None])
        self._update_done()

    def run(self) -> int:
        """Rounds until every sequence has max_new tokens or an EOS; returns the rounds run."""
        rounds = 0
        self.head.armed.fill_(True)
        try:
            while True:
                n_out, done = torch.stack([self.n_out, self.done.long()]).cpu()  # the one sync per round
                if bool(done.all()):
                    return rounds
                left = int((self.max_new - n_out[~done.bool()]).max())
                self._steps(min(self.head.every, left))
                rounds += 1
        finally:
            self.head.armed.fill_(False)

    def _steps(self, n: int) -> None:
        r, gen = self.round, self.gen
        start_pos, start_tok = self.store.seen.clone(), gen.cur_tok.clone()
        gen.out, gen.finished = r.cand, torch.zeros_like(gen.finished)
        gen.step_idx.zero_()
        for s in range(n):
            gen.decode_step(_GREEDY, None, self.pad_id)  # candidate -> cand[:, s] and cur_tok; seen += 1
            r.hidden[s].copy_(self.last_hidden)
            r.proved[s].copy_(self.last_proved)
            r.feed_pos[s].copy_(self.store.seen)
        self._verify(n, start_pos, start_tok)

    def _verify(self, n: int, start_pos: torch.Tensor, start_tok: torch.Tensor) -> None:
        r, B = self.round, self.store.batch
        dev = self.n_out.device
        full = torch.nn.functional.linear(r.hidden[:n].reshape(n * B, -1), self.head.weight).argmax(dim=-1).view(n, B)
        cand = r.cand[:, :n].T  # [n, B]
        wrong = full != cand
        first_wrong = torch.where(wrong.any(dim=0), wrong.int().argmax(dim=0), n)
        rows = torch.arange(n, device=dev)[:, None]
        room = self.max_new - 1 - self.n_out  # rows that still fit in the output
        last = torch.minimum(torch.minimum(first_wrong, room), torch.full_like(room, n - 1))
        last = torch.where(self.done, -1, last)  # finished sequences keep nothing of this round
        keep = rows <= last[None, :]  # [n, B]: the full head's tokens, emitted
        col = torch.where(keep, self.n_out[None, :] + rows, self.max_new)
        self.out.scatter_(1, col.T, full.T)
        self._count(keep, rows, first_wrong, r.proved[:n], n * B)
        self.n_out += last + 1
        # Continue from the last kept token (fed where its row says); finished sequences
        # return to where the round started.
        idx = last.clamp(min=0)[None, :]
        kept_tok = full.gather(0, idx)[0]
        self.gen.cur_tok.copy_(torch.where(last >= 0, kept_tok, start_tok[:, 0])[:, None])
        self.store.rollback(torch.where(last >= 0, r.feed_pos[:n].gather(0, idx)[0], start_pos))
        self._update_done()

    def _count(self, keep, rows, first_wrong, proved, total) -> None:
        c = self.head.counters
        corrected = keep & (rows == first_wrong[None, :])
        bound = keep & proved & ~corrected
        accepted = keep & ~proved & ~corrected
        c[rt.BOUND].add_(bound.sum())
        c[rt.ACCEPTED].add_(accepted.sum())
        c[rt.CORRECTED].add_(corrected.sum())
        c[rt.DISCARDED].add_(total - keep.sum())
        c[rt.ROUNDS].add_(1)

    def _update_done(self) -> None:
        full = self.n_out >= self.max_new
        if self.eos is not None:
            cols = torch.arange(self.max_new, device=self.out.device)[None, :]
            hit = torch.isin(self.out[:, :self.max_new], self.eos) & (cols < self.n_out[:, None])
            full |= hit.any(dim=1)
        self.done.copy_(full)

    def tokens(self) -> torch.Tensor:
        """[B, max_new] on CPU; after a sequence's first EOS, pad_id."""
        out = self.out[:, :self.max_new].cpu()
        if self.eos is not None:
            hit = torch.isin(out, self.eos.cpu()).int()
            after = (hit.cumsum(dim=1) - hit) > 0
            out = out.masked_fill(after, self.pad_id)
        return out


def generate_verified(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    config,
    max_new_tokens: int = 128,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    prefill_chunk: int = 512,
    codegen: str = "auto",
) -> GenerateOutput:
    """Greedy generation whose tokens equal the full LM head's, with the VQ head's deferred
    batched verification (module doc). Arguments as slimfx.runtime.generate (greedy only;
    no capacity: the store holds the whole sequence plus one round, so rollback is exact).

    Returns GenerateOutput(tokens [B, max_new_tokens] int64 CPU, stats) with stats:
    prefill_s, decode_s, rounds, decode_steps (model calls after prefill), new_tokens,
    steps_per_token, kv_bytes, codegen.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens: got {max_new_tokens!r}; allowed: an integer >= 1")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 16 or prefill_chunk & (prefill_chunk - 1):
        raise GenerateError(f"prefill_chunk: got {prefill_chunk!r}; allowed: a power of two >= 16")
    opts, cfg = _deferred_options(config)
    lengths = prompt_lengths(input_ids, attention_mask)
    B, T = input_ids.shape
    needed = padded_prompt_length(T, prefill_chunk) + max_new_tokens + opts["verify_every"]
    capacity = -(-needed // 256) * 256
    gen = get_generator(model, B, capacity, config=config, codegen=codegen)
    device = gen.store.device
    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.int64, device=device)
    with torch.inference_mode():
        gen.store.reset()
        sync_device(device)
        t0 = time.perf_counter()
        logits = gen.prefill(input_ids, lengths, prefill_chunk)  # compiles the graphs on first use
        head = _head_of(model, cfg, opts)
        _check_store(gen.store, needed)
        loop = VerifiedLoop(gen, head, max_new_tokens, pad_token_id, eos)
        loop.emit_first(logits)
        sync_device(device)
        t_prefill = time.perf_counter() - t0
        before = head.counters.clone()
        t1 = time.perf_counter()
        rounds = loop.run()
        sync_device(device)
        decode_s = time.perf_counter() - t1
        steps = int((head.counters - before)[[rt.BOUND, rt.ACCEPTED, rt.CORRECTED, rt.DISCARDED]].sum()) // B
        tokens = loop.tokens()
    emitted = (int(loop.n_out.sum()) - B) / B  # tokens per sequence after the prefill token
    stats = {"prefill_s": t_prefill, "decode_s": decode_s, "rounds": rounds, "decode_steps": steps,
             "new_tokens": max_new_tokens, "steps_per_token": steps / emitted if emitted > 0 else float("nan"),
             "verify_every": head.every, "kv_bytes": gen.store.nbytes(), "batch": B, "codegen": gen.codegen}
    return GenerateOutput(tokens, stats)


def _head_of(model, cfg, opts) -> rt.DeferredHead:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    path = cfg.artifact_path(opts["codebook"])
    head = rt.find_deferred_head(weight, path, opts["verify_every"], opts["probes"]) if isinstance(weight, torch.Tensor) else None
    if head is None:
        raise ConfigError(f"passes.vq_logits: no deferred VQ head was compiled for this model's LM head with "
                          f"artifacts.{opts['codebook']} ({path}); the pass was skipped (see the compile report)")
    return head


def _check_store(store, needed: int) -> None:
    why = store.rollback_refusal()
    if why:
        raise KVStoreError(f"generate_verified: {why}; allowed: no kv_eviction or kv_quantize (rollback must be exact)")
    small = {i: c.capacity for i, c in store.sites.items() if c.capacity < needed}
    if small:
        raise KVStoreError(f"generate_verified: sites {sorted(small)} hold fewer slots ({min(small.values())}) than the "
                           f"{needed} positions a rollback may need; allowed: no eviction, capacity >= prompt + new tokens + verify_every")
