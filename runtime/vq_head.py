"""The VQ logits head at run time: the codebook artifact and the two head ops.

Artifact (built by `slimfx calibrate vq-head`, calibrate/vq_head.py; written and read
here; safetensors, never pickle):

    codebook       [K, H] f32   mean of each cluster's head rows (the code vectors)
    token_to_code  [V] int32    cluster of every token
    members        [K, M] int32 tokens of every cluster, padded with -1 (M = largest cluster)
    sizes          [K] int32    members per cluster
    radii          [K] f32      max_t |w_t - codebook[c]| over the members t of c
    scale          [V] f32      w_t . mu_c / |mu_c|^2: the token's length along its code
    metadata       format=slimfx.vq_head, version, vocab, hidden, k, seed, balance, iters, source

Ops (torch.library custom ops with fake impls, so the rewritten graph survives dynamo,
AOTAutograd and export):

    torch.ops.slimfx.vq_head_approx(hidden [..., H], codebook [K, H], token_to_code [V], scale [V] | None)
        -> logits [..., V]: code logits h . mu_c scattered to the vocabulary (times scale_t
           when given). LOSSY: every token of a cluster shares its code's logit (x scale).

    torch.ops.slimfx.vq_head_exact(hidden [..., H], weight [V, H], codebook [K, H], slack [K] f32,
                                   members [K, M] int32, counters [2] int64 (mutated), probes)
        -> logits [..., V] whose argmax is the full head's argmax (see exact_head).

    torch.ops.slimfx.vq_head_deferred(hidden, weight, codebook, slack, members,
                                      counters [6] int64, armed [1] bool, last_hidden [N, H],
                                      last_proved [N] bool, probes)
        -> logits [..., V]. Opens the codes of highest *score* (not bound). Unarmed it is the
           exact op (full head where the bound does not prove). Armed (by the deferred
           verification loop, runtime/vq_verify.py) it never runs the full head: the argmax
           is the probed candidate, which the loop verifies k steps at a time against the
           full head and rolls back when wrong. Every call writes the rows' hidden states
           and proved flags into last_hidden / last_proved for the loop to stash.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from slimfx.compiler.config import ConfigError
from slimfx.runtime.custom_ops import custom_op

FORMAT = "slimfx.vq_head"
VERSION = "1"
_TENSORS = ("codebook", "token_to_code", "members", "sizes", "radii", "scale")
_IMPL_ENV = "SLIMFX_VQ_HEAD"
_IMPLS = ("auto", "ref", "triton")


@dataclass
class VQHeadArtifact:
    """A head codebook (shapes in the module docstring). Tensors on CPU."""

    codebook: torch.Tensor
    token_to_code: torch.Tensor
    members: torch.Tensor
    sizes: torch.Tensor
    radii: torch.Tensor
    scale: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def vocab(self) -> int:
        return int(self.token_to_code.shape[0])

    def tensors(self) -> dict:
        return {name: getattr(self, name).contiguous() for name in _TENSORS}


# ----------------------------------------------------------------------------- writing


def save_artifact(art: VQHeadArtifact, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(art.tensors(), str(tmp), metadata={k: str(v) for k, v in art.metadata.items()})
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


# ----------------------------------------------------------------------------- loading + validation


def _fail(key: str, path, what: str) -> ConfigError:
    return ConfigError(f"artifacts.{key} ({path}): {what}")


def load_artifact(path: str | os.PathLike, key: str = "vq_head", *, vocab: int | None = None,
                  hidden: int | None = None) -> VQHeadArtifact:
    """Read and validate a VQ head artifact. Every problem is a one-line ConfigError naming
    `artifacts.KEY`, the file, and what was expected (vocab/hidden: the model's head)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(key, path, "no such file; create it with `slimfx calibrate vq-head --out PATH`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            found = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise _fail(key, path, f"not a readable safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})") from None
    if meta.get("format") != FORMAT:
        raise _fail(key, path, f"metadata format is {meta.get('format')!r}; expected {FORMAT!r} (a file from `slimfx calibrate vq-head`)")
    missing = [n for n in _TENSORS if n not in found]
    if missing:
        raise _fail(key, path, f"missing tensors {', '.join(missing)}; expected {', '.join(_TENSORS)}")
    art = VQHeadArtifact(**{n: found[n] for n in _TENSORS}, metadata=meta)
    validate_artifact(art, key, path, vocab=vocab, hidden=hidden)
    return art


def validate_artifact(art: VQHeadArtifact, key: str, path, *, vocab: int | None = None, hidden: int | None = None) -> None:
    """Shapes, dtypes and the consistency of members with token_to_code (see load_artifact)."""
    cb = art.codebook
    if cb.dim() != 2 or cb.dtype != torch.float32:
        raise _fail(key, path, f"codebook is {tuple(cb.shape)} {cb.dtype}; expected [K, H] float32")
    k, h = cb.shape
    v = art.token_to_code.shape[0] if art.token_to_code.dim() == 1 else -1
    expect = {
        "token_to_code": ((v,), torch.int32), "sizes": ((k,), torch.int32),
        "radii": ((k,), torch.float32), "scale": ((v,), torch.float32),
    }
    for name, (shape, dtype) in expect.items():
        t = getattr(art, name)
        if tuple(t.shape) != shape or t.dtype != dtype or v < 0:
            raise _fail(key, path, f"{name} is {tuple(t.shape)} {t.dtype}; expected {list(shape)} {dtype} (K={k}, V={v})")
    if art.members.dim() != 2 or art.members.shape[0] != k or art.members.dtype != torch.int32:
        raise _fail(key, path, f"members is {tuple(art.members.shape)} {art.members.dtype}; expected [{k}, M] int32")
    if hidden is not None and h != hidden:
        raise _fail(key, path, f"codebook has hidden size {h}; expected {hidden} (the model's LM head input)")
    if vocab is not None and v != vocab:
        raise _fail(key, path, f"token_to_code covers {v} tokens; expected {vocab} (the model's vocabulary)")
    codes = art.token_to_code.long()
    if v and (codes.min() < 0 or codes.max() >= k):
        raise _fail(key, path, f"token_to_code has codes outside [0, {k})")
    if not torch.equal(torch.bincount(codes, minlength=k).int(), art.sizes):
        raise _fail(key, path, "sizes do not match token_to_code")
    mem = art.members.long()
    valid = mem >= 0
    if (mem >= v).any() or not torch.equal(valid.sum(1).int(), art.sizes):
        raise _fail(key, path, "members do not match sizes (tokens outside the vocabulary or wrong counts)")
    rows = torch.arange(k)[:, None].expand_as(mem)[valid]
    if not torch.equal(codes[mem[valid]], rows) or torch.unique(mem[valid]).numel() != v:
        raise _fail(key, path, "members do not match token_to_code (every token must sit once, in its own code)")
    if not torch.isfinite(cb).all() or not torch.isfinite(art.scale).all() or (art.radii < 0).any():
        raise _fail(key, path, "non-finite codebook/scale or negative radii")


# ----------------------------------------------------------------------------- exact-mode slack


def exact_slack(weight: torch.Tensor, codebook: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """slack [K] f32 such that h . w_t <= h . mu_c + |h| * slack_c for every member t of c,
    including f32 rounding of both dot products.

    The radius is measured against the codebook *as stored on the device* (in the head's
    dtype) and the head rows as they are, so the bound holds for the tensors the kernels
    read, not only for the calibration copy. Rounding: a length-H f32 dot product errs by
    at most about H * 2^-24 * |h| |x| (x = mu or w_t); gamma doubles that for safety.
    """
    k, m = members.shape
    mu = codebook.float()
    gamma = 2.0 * codebook.shape[1] * 2.0 ** -24
    radii = torch.zeros(k, device=weight.device)
    wmax = torch.zeros(k, device=weight.device)
    chunk = max(1, (1 << 24) // max(1, m * codebook.shape[1]))  # bound the [chunk, M, H] temporary
    for s in range(0, k, chunk):
        ids = members[s:s + chunk].long()
        valid = ids >= 0
        w = weight[ids.clamp_min(0)].float()
        dist = (w - mu[s:s + chunk, None, :]).norm(dim=2).masked_fill(~valid, 0.0)
        radii[s:s + chunk] = dist.amax(dim=1)
        wmax[s:s + chunk] = w.norm(dim=2).masked_fill(~valid, 0.0).amax(dim=1)
    return (radii + gamma * (mu.norm(dim=1) + 2 * wmax)).float().contiguous()


# ----------------------------------------------------------------------------- implementations


def _use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get(_IMPL_ENV, "auto")
    if mode not in _IMPLS:
        raise ValueError(f"{_IMPL_ENV}={mode!r}; allowed: {', '.join(_IMPLS)}")
    return t.is_cuda if mode == "auto" else mode == "triton"


def _kernels(t: torch.Tensor):
    from slimfx.codegen.kernels import vq_head as kr

    if _use_triton(t):
        return kr.vq_code_scores, kr.vq_probe_argmax, kr.vq_fallback_logits
    return kr.vq_code_scores_ref, kr.vq_probe_argmax_ref, None


def approx_head(h: torch.Tensor, codebook: torch.Tensor, token_to_code: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """h [N, H] -> logits [N, V] f32: logit_t = h . mu_code(t) (x scale_t)."""
    scores_fn = _kernels(h)[0]
    scores = scores_fn(h.contiguous(), codebook)
    logits = scores.index_select(1, token_to_code.long())
    return logits * scale[None, :] if scale is not None else logits


def _open_codes(scores: torch.Tensor, bounds: torch.Tensor, p: int, open_by: str):
    """(opened [N, p] code ids, rest [N]: the highest bound among the unopened codes)."""
    n, k = bounds.shape
    if open_by == "bound":  # minimises `rest`: the best chance for the bound to prove
        top = bounds.topk(min(p + 1, k), dim=1)
        rest = top.values[:, p] if p < k else torch.full((n,), float("-inf"), device=bounds.device)
        return top.indices[:, :p].contiguous(), rest
    if open_by != "score":
        raise ValueError(f"open_by: got {open_by!r}; allowed: 'bound', 'score'")
    # The most likely winners: on SmolLM2 the slack term (|h| r_c ~ 125 vs a ~2 logit gap)
    # swamps the bound, so opening by bound finds the argmax 0% of the time at 8 probes.
    opened = scores.topk(p, dim=1).indices.contiguous()
    rest = bounds.scatter(1, opened, float("-inf")).amax(dim=1) if p < k else torch.full((n,), float("-inf"), device=bounds.device)
    return opened, rest


def exact_head(h: torch.Tensor, weight: torch.Tensor, codebook: torch.Tensor, slack: torch.Tensor,
               members: torch.Tensor, probes: int, out_dtype: torch.dtype | None = None, *,
               open_by: str = "bound", skip_full: torch.Tensor | None = None):
    """h [N, H] -> (logits [N, V], proved [N] bool, token [N] int64).

    1. score the codes and their upper bounds u_c = h . mu_c + |h| slack_c,
    2. open the `probes` codes of highest bound (open_by="score": highest score) and
       compute their members' exact logits,
    3. proved = best member logit > the highest bound among unopened codes: no token
       outside the opened clusters can beat it, so `token` is the full head's argmax;
    4. rows not proved get the full head's logits (same step: nothing was emitted yet,
       so no rollback is needed); proved rows get -inf except the opened members' exact
       logits. The argmax of every row is the full head's; the other entries are not the
       full head's, so sampling from exact-mode logits is not exact.

    skip_full [N] bool (device): rows that skip step 4 even when not proved; their argmax
    is then `token`, the best opened member (an unverified candidate: deferred mode).
    """
    scores_fn, probe_fn, fallback_fn = _kernels(h)
    h = h.contiguous()
    n, k = h.shape[0], codebook.shape[0]
    scores, bounds = scores_fn(h, codebook, slack)
    opened, rest = _open_codes(scores, bounds, min(probes, k), open_by)
    member_logits, best, token = probe_fn(h, weight, members, opened)
    proved = best > rest
    emit = proved if skip_full is None else proved | skip_full
    out = torch.empty(n, weight.shape[0], device=h.device, dtype=out_dtype or h.dtype)
    if fallback_fn is not None:
        fallback_fn(h, weight, emit.to(torch.int32), out)
    elif bool(emit.all()):  # CPU reference: a host branch is free here
        out.fill_(float("-inf"))
    else:
        from slimfx.codegen.kernels.vq_head import vq_fallback_logits_ref

        vq_fallback_logits_ref(h, weight, emit, out)
    _write_members(out, members, opened, member_logits, emit, token, best)
    return out, proved, token


def _write_members(out, members, opened, member_logits, proved, token, best) -> None:
    """Write the opened members' exact logits into proved rows. Padding slots are pointed
    at the winning token with its own logit, so duplicate scatter targets agree."""
    ids = members[opened].long().flatten(1)  # [N, P*M]
    vals = member_logits.flatten(1)
    pad = ids < 0
    ids = torch.where(pad, token[:, None], ids)
    vals = torch.where(pad, best[:, None], vals).to(out.dtype)
    keep = out.gather(1, ids)
    out.scatter_(1, ids, torch.where(proved[:, None], vals, keep))


# ----------------------------------------------------------------------------- custom ops


@custom_op("slimfx::vq_head_approx", mutates_args=())
def vq_head_approx(hidden: torch.Tensor, codebook: torch.Tensor, token_to_code: torch.Tensor,
                   scale: Optional[torch.Tensor]) -> torch.Tensor:
    lead = hidden.shape[:-1]
    logits = approx_head(hidden.reshape(-1, hidden.shape[-1]), codebook, token_to_code, scale)
    return logits.to(hidden.dtype).reshape(*lead, token_to_code.shape[0])


@vq_head_approx.register_fake
def _(hidden, codebook, token_to_code, scale):
    return hidden.new_empty(*hidden.shape[:-1], token_to_code.shape[0])


@custom_op("slimfx::vq_head_exact", mutates_args=("counters",))
def vq_head_exact(hidden: torch.Tensor, weight: torch.Tensor, codebook: torch.Tensor, slack: torch.Tensor,
                  members: torch.Tensor, counters: torch.Tensor, probes: int) -> torch.Tensor:
    lead = hidden.shape[:-1]
    out, proved, _ = exact_head(hidden.reshape(-1, hidden.shape[-1]), weight, codebook, slack, members, probes)
    n_proved = proved.sum()
    counters[0].add_(n_proved)  # device-side counts: no host sync in the decode step
    counters[1].add_(proved.numel() - n_proved)
    return out.reshape(*lead, weight.shape[0])


@vq_head_exact.register_fake
def _(hidden, weight, codebook, slack, members, counters, probes):
    return hidden.new_empty(*hidden.shape[:-1], weight.shape[0])


@custom_op("slimfx::vq_head_deferred", mutates_args=("counters", "last_hidden", "last_proved"))
def vq_head_deferred(hidden: torch.Tensor, weight: torch.Tensor, codebook: torch.Tensor, slack: torch.Tensor,
                     members: torch.Tensor, counters: torch.Tensor, armed: torch.Tensor, last_hidden: torch.Tensor,
                     last_proved: torch.Tensor, probes: int) -> torch.Tensor:
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    skip = armed.expand(h.shape[0])
    out, proved, _ = exact_head(h, weight, codebook, slack, members, probes, open_by="score", skip_full=skip)
    last_hidden.copy_(h)
    last_proved.copy_(proved)
    # Unarmed rows are final here (bound or full head); armed rows are counted by the
    # verification loop, which alone knows whether their token was kept.
    counters[BOUND].add_((proved & ~skip).sum())
    counters[FALLBACK].add_((~proved & ~skip).sum())
    return out.reshape(*lead, weight.shape[0])


@vq_head_deferred.register_fake
def _(hidden, weight, codebook, slack, members, counters, armed, last_hidden, last_proved, probes):
    return hidden.new_empty(*hidden.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- route counters

# Slots of a counters tensor. Bound-mode heads have [2]; deferred heads [6].
BOUND, FALLBACK, ACCEPTED, CORRECTED, DISCARDED, ROUNDS = range(6)
_ROUTES = ("bound", "fallback", "accepted", "corrected", "discarded", "rounds")

_HEADS: dict[str, torch.Tensor] = {}


def new_counters(name: str, device, deferred: bool = False) -> torch.Tensor:
    """An int64 device counter registered under name: [2] (proved by the bound, full-head
    fallback) or, for a deferred head, [6] (see route_counts)."""
    counters = torch.zeros(6 if deferred else 2, dtype=torch.int64, device=device)
    _HEADS[name] = counters
    return counters


def route_counts(name: str | None = None) -> dict:
    """{head name: counts}. Every head: "bound" (tokens proved by the bound), "fallback"
    (tokens that took the full head in the same step), "bound_rate". Deferred heads also:
    "accepted" (unproved candidates the batched full head confirmed), "corrected" (a
    wrong candidate replaced by the full head's token, then KV rollback), "discarded"
    (head rows thrown away: after a wrong candidate in the same round, or past the end),
    "rounds" (batched verifications) and "accept_rate" = accepted / (accepted + corrected).
    Tokens emitted = bound + fallback + accepted + corrected."""
    out = {}
    for key, c in _HEADS.items():
        if name is not None and key != name:
            continue
        vals = dict(zip(_ROUTES, (int(x) for x in c.tolist())))
        tokens = sum(vals[r] for r in ("bound", "fallback", "accepted", "corrected") if r in vals)
        vals["bound_rate"] = vals["bound"] / tokens if tokens else math.nan
        if "accepted" in vals:
            checked = vals["accepted"] + vals["corrected"]
            vals["accept_rate"] = vals["accepted"] / checked if checked else math.nan
        out[key] = vals
    return out


def reset_counts() -> None:
    for c in _HEADS.values():
        c.zero_()


# ----------------------------------------------------------------------------- deferred heads


@dataclass
class DeferredHead:
    """What the verification loop needs of a head compiled with verify = "deferred".

    weight [V, H]: the full head (verification reads it once per round).
    armed [1] bool: set by the loop; while set, unproved rows emit their candidate.
    last: {rows N: (hidden [N, H], proved [N] bool)} written by every call of the op.
    every: rows verified per round (passes.vq_logits.verify_every)."""

    name: str
    artifact: str
    weight: torch.Tensor
    counters: torch.Tensor
    armed: torch.Tensor
    every: int
    probes: int
    last: dict = field(default_factory=dict)

    def last_buffers(self, rows: int) -> tuple:
        """The (hidden [rows, H], proved [rows]) buffers of graphs whose head sees `rows` rows."""
        if rows not in self.last:
            w = self.weight
            self.last[rows] = (torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device),
                               torch.zeros(rows, dtype=torch.bool, device=w.device))
        return self.last[rows]


_DEFERRED: dict[str, DeferredHead] = {}


def new_deferred_head(name: str, artifact: str, weight: torch.Tensor, every: int, probes: int) -> DeferredHead:
    head = DeferredHead(name, artifact, weight, new_counters(name, weight.device, deferred=True),
                        torch.zeros(1, dtype=torch.bool, device=weight.device), every, probes)
    _DEFERRED[name] = head
    return head


def find_deferred_head(weight: torch.Tensor, artifact: str | os.PathLike, every: int, probes: int) -> DeferredHead | None:
    """The deferred head compiled for this head weight (same storage), artifact file,
    verify_every and probes (the newest when several match), or None."""
    found = None
    for head in _DEFERRED.values():
        if (head.artifact, head.every, head.probes) == (str(artifact), every, probes) and head.weight.data_ptr() == weight.data_ptr():
            found = head
    return found
