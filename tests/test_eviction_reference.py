"""Every eviction policy's keep set against a plain reference of its paper's rule.

The reference below is written from the papers' descriptions (module table of
passes/kv_eviction/policies.py), token by token with Python sets and dicts: a prompt is
scored chunk by chunk (one chunk: the papers' "compress after the prompt"), then each
generated token frees the least-ranked unprotected slot, is written, and its query's
attention updates the scores. The op (attention_ref over an evict site, batched, left
padded) must hold exactly the reference's tokens after the prompt and after every step.
D2O keeps as H2O does and merges what it evicts (`merge`): there the kept keys and values
must equal the reference's too.
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from slimfx.passes.kv_eviction.eviction_op import evict_site
from slimfx.passes.kv_eviction.policies import POLICIES, make_policy, uniform_hash
from slimfx.runtime.attention_op import attention_ref

HQ_PER_KV = 2
DECAY = {"h2o": 1.0, "a2sf": 0.8, "tova": 0.0, "keyformer": 1.0, "d2o": 1.0}
PARAM = {"a2sf": 0.8, "keyformer": 0.7, "snapkv": 3, "d2o": 0.6}


def _probs(q_heads, keys, logit_noise=None, tau=1.0):
    """Softmax of every query head over `keys` [n, D]: [heads, n]."""
    logits = q_heads.double() @ keys.double().T / math.sqrt(q_heads.shape[-1])
    if logit_noise is not None:
        logits = (logits + logit_noise) / tau
    return torch.softmax(logits, dim=-1)


def _gumbel(t, positions, seed=0):
    u = uniform_hash(torch.tensor([t * 1_000_003 + p for p in positions]), seed).double().clamp(1e-6, 1 - 1e-6)
    return -torch.log(-torch.log(u))


class Reference:
    """One sequence, every kv head: kept positions and their scores (dict per head)."""

    def __init__(self, name, q, k, v, capacity, n_sink, window, mean=False):
        self.name, self.q, self.k, self.v, self.C, self.n_sink, self.window = name, q, k, v, capacity, n_sink, window
        self.mean = mean  # H2O's mass per query that has seen the token (its `mass = "mean"`)
        self.seen = 0  # tokens seen when ranking
        self.hkv = k.shape[0]
        self.held = [dict() for _ in range(self.hkv)]  # position -> score
        self.kv = [dict() for _ in range(self.hkv)]  # position -> (key, value) as held (D2O merges change them)
        self.tau = [None] * self.hkv  # D2O's moving merge threshold per head

    def group(self, h):
        return slice(h * HQ_PER_KV, (h + 1) * HQ_PER_KV)

    def rank(self, h, p):
        s = self.held[h][p]
        if self.name in ("streaming", "duo"):
            return float(p)
        if self.name == "tova":  # one ranking per layer: the mean over heads
            return sum(self.held[g][p] for g in range(self.hkv)) / self.hkv
        if self.name == "snapkv":
            return s if s > 0 else -1.0 / (p + 2)
        if self.mean:  # queries p, ..., seen - 1 attended token p
            return s / max(self.seen - p, 1)
        return s

    def protected(self, p, seen):
        return p < self.n_sink or p >= seen - self.window

    def held_keys(self, h, positions):
        return torch.stack([self.kv[h][p][0] for p in positions])

    def prefill_chunk(self, a, b):
        for h in range(self.hkv):
            keys = sorted(self.held[h]) + list(range(a, b))
            self.kv[h].update({t: (self.k[h, t], self.v[h, t]) for t in range(a, b)})
            scores = {p: self.held[h].get(p, 0.0) for p in keys}
            if self.name in DECAY:
                for t in range(a, b):
                    vis = [p for p in keys if p <= t]
                    noise = _gumbel(t, vis) if self.name == "keyformer" else None
                    mass = _probs(self.q[self.group(h), t], self.held_keys(h, vis), noise, PARAM.get("keyformer", 1.0) if noise is not None else 1.0).sum(0)
                    for p in keys:
                        scores[p] *= DECAY[self.name]
                    for p, m in zip(vis, mass.tolist()):
                        scores[p] += m
            elif self.name == "snapkv":
                scores = self.snapkv(h, keys, a, b)
            self.held[h] = scores
        self.keep_top(b)

    def snapkv(self, h, keys, a, b):
        w = min(PARAM["snapkv"], b - a)
        mass = torch.zeros(len(keys), dtype=torch.float64)
        for t in range(b - w, b):
            vis = [i for i, p in enumerate(keys) if p <= t]
            mass[vis] += _probs(self.q[self.group(h), t], self.k[h, [keys[i] for i in vis]]).mean(0)
        scores = {}
        for i, p in enumerate(keys):  # max over the 7 neighbouring keys before the window
            if p >= b - w:
                scores[p] = float(mass[i])
            else:
                scores[p] = max(float(mass[j]) for j in range(len(keys)) if abs(j - i) <= 3 and keys[j] < b - w)
        return scores

    def keep_top(self, seen):
        # Rankings are read before anything is dropped (TOVA's mean spans every head).
        self.seen = seen
        ranks = [{p: self.rank(h, p) for p in self.held[h]} for h in range(self.hkv)]
        for h in range(self.hkv):
            prot = [p for p in self.held[h] if self.protected(p, seen)]
            cand = sorted((p for p in self.held[h] if not self.protected(p, seen)), key=lambda p: (-ranks[h][p], p))
            keep = set(prot) | set(cand[:max(self.C - len(prot), 0)])
            self.held[h] = {p: s for p, s in self.held[h].items() if p in keep}
            self.drop(h, [p for p in self.kv[h] if p not in keep])

    def drop(self, h, evicted):
        """Forget the evicted positions; D2O merges each into its nearest kept key (cosine)
        when that similarity reaches the moving threshold, weighted exp(u) against the kept
        token's own e."""
        gone = [(p, *self.kv[h].pop(p)) for p in evicted]
        if self.name != "d2o" or not gone:
            return
        kept = sorted(self.held[h])
        nearest = []
        for _, k, v in gone:
            sims = [float(torch.nn.functional.cosine_similarity(k.double(), self.kv[h][c][0].double(), dim=0, eps=1e-12)) for c in kept]
            best = max(range(len(kept)), key=lambda i: sims[i])
            nearest.append((sims[best], kept[best], k, v))
        mean = sum(u for u, *_ in nearest) / len(nearest)
        ema = PARAM["d2o"]
        self.tau[h] = mean if self.tau[h] is None else ema * self.tau[h] + (1 - ema) * mean
        for c in kept:
            into = [(math.exp(u), k, v) for u, target, k, v in nearest if target == c and u >= self.tau[h]]
            if into:
                total = math.e + sum(w for w, _, _ in into)
                kc, vc = self.kv[h][c]
                self.kv[h][c] = ((math.e * kc.double() + sum(w * k.double() for w, k, _ in into)) / total,
                                 (math.e * vc.double() + sum(w * v.double() for w, _, v in into)) / total)

    def decode(self, t):
        self.seen = t
        ranks = [{p: self.rank(h, p) for p in self.held[h]} for h in range(self.hkv)]
        for h in range(self.hkv):
            victim = None
            if len(self.held[h]) >= self.C:
                cand = [p for p in self.held[h] if not self.protected(p, t)]
                victim = min(cand, key=lambda p: (ranks[h][p], p))
                del self.held[h][victim]
            self.held[h][t] = 0.0
            self.kv[h][t] = (self.k[h, t], self.v[h, t])
            if victim is not None:  # merged into the kept tokens, the new one included
                self.drop(h, [victim])
            if self.name in DECAY:
                vis = sorted(self.held[h])
                mass = _probs(self.q[self.group(h), t], self.held_keys(h, vis)).sum(0)
                for p, m in zip(vis, mass.tolist()):
                    self.held[h][p] = DECAY[self.name] * self.held[h][p] + m

    def kept(self):
        return [sorted(d) for d in self.held]


def _op_kept(cache, b):
    pos = cache.slot_pos[b].long()
    return [sorted(pos[h][pos[h] >= 0].tolist()) for h in range(pos.shape[0])]


def _check_held_values(cache, b, ref):
    """Every kept token's key and value are the reference's (merged ones included)."""
    pos = cache.slot_pos[b].long()
    for h in range(pos.shape[0]):
        for slot in (pos[h] >= 0).nonzero().flatten().tolist():
            k, v = ref.kv[h][int(pos[h, slot])]
            torch.testing.assert_close(cache.k[b, h, slot].double(), k.double(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.v[b, h, slot].double(), v.double(), rtol=1e-4, atol=1e-5)


# H2O's mean-per-query variant runs as "h2o-mean" (policy h2o, layout param 1.0).
@pytest.mark.parametrize("name", [*sorted(POLICIES), "h2o-mean"])
@settings(max_examples=12, deadline=None)
@given(data=st.data(), hkv=st.integers(1, 2), n_pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_keep_set_matches_the_papers_rule(name, data, hkv, n_pad, seed):
    """A random stream through the op; sequence 1 is left-padded by n_pad tokens (pads
    must never take kept slots). Chunked prefill when the chunk is shorter than the prompt."""
    n_sink, window = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 3))
    capacity = data.draw(st.integers(n_sink + window + 2, 12))
    T = data.draw(st.integers(capacity + 1, capacity + 8))
    chunk = data.draw(st.sampled_from([T + n_pad, 4, 8]))
    steps = data.draw(st.integers(0, 6))
    D, P = 8, T + n_pad
    assume(P % chunk != 1)  # a one-token chunk would be a decode step (the runtime's chunks are >= 16)
    g = torch.Generator().manual_seed(seed)
    # Sequence 0: P real tokens; sequence 1: n_pad pads (negative positions), then T real.
    pads = (0, n_pad)
    streams = [[torch.randn(H, P - n + steps, D, generator=g) * s for H, s in ((hkv * HQ_PER_KV, 2.0), (hkv, 1.0), (hkv, 1.0))]
               for n in pads]
    q, k, v = (torch.stack([torch.cat([torch.zeros(x.shape[0], n, D), x], dim=1) for n, x in zip(pads, xs)])
               for xs in zip(*streams))
    positions = torch.stack([torch.arange(P + steps) - n for n in pads])
    mean = name == "h2o-mean"
    name = "h2o" if mean else name
    cache = evict_site(2, hkv, capacity, D, policy=name, n_sink=n_sink, window=window, param=1.0 if mean else PARAM.get(name, 0.0))
    refs = [Reference(name, *stream, capacity, n_sink, window, mean) for stream in streams]
    for a in range(0, P, chunk):
        b_ = min(a + chunk, P)
        attention_ref(q[:, :, a:b_], k[:, :, a:b_], v[:, :, a:b_], positions[:, a:b_], cache)
        for n, r in zip(pads, refs):
            lo, hi = max(a - n, 0), b_ - n
            if hi > lo:
                r.prefill_chunk(lo, hi)
    for b in range(2):
        assert _op_kept(cache, b) == refs[b].kept(), f"after the prompt, sequence {b}"
        _check_held_values(cache, b, refs[b])
    for i in range(P, P + steps):
        attention_ref(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], positions[:, i:i + 1], cache)
        for b in range(2):
            refs[b].decode(int(positions[b, i]))
            assert _op_kept(cache, b) == refs[b].kept(), f"after step {i}, sequence {b}"
            _check_held_values(cache, b, refs[b])
