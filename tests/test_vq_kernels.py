"""VQ head kernels against their references (codegen/kernels/vq_head.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 at small sizes (tests/conftest.py sets it); with a GPU they
run compiled on larger shapes too.
"""

from __future__ import annotations

import pytest
import torch

# TRITON_INTERPRET is set by conftest.py before any kernel module is imported.
HAS_CUDA = torch.cuda.is_available()

import slimfx.codegen.kernels.vq_head as kr

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
# (rows N, hidden H, vocab V, codes K): odd sizes, H not a multiple of the tile.
SHAPES = [(1, 24, 50, 5), (3, 40, 97, 7), (2, 33, 64, 16)]
if HAS_CUDA:
    SHAPES += [(1, 576, 49152, 1024), (4, 2048, 128256, 1024)]


def _members(v: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random partition of v tokens into k clusters of unequal size, padded with -1."""
    codes = torch.cat([torch.arange(k), torch.randint(0, k, (v - k,), generator=gen)])[torch.randperm(v, generator=gen)]
    m = int(torch.bincount(codes, minlength=k).max())
    members = torch.full((k, m), -1, dtype=torch.int32)
    for c in range(k):
        ids = (codes == c).nonzero().flatten()
        members[c, : ids.numel()] = ids.to(torch.int32)
    return members


def _inputs(n, h, v, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    w = torch.randn(v, h, generator=gen).to(DEVICE, dtype)
    cb = torch.randn(k, h, generator=gen).to(DEVICE, dtype)
    members = _members(v, k, gen).to(DEVICE)
    return x, w, cb, members, gen


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max().item()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_code_scores_match_reference(shape, dtype):
    n, h, v, k = shape
    x, _, cb, _, gen = _inputs(n, h, v, k, dtype)
    slack = torch.rand(k, generator=gen).to(DEVICE)
    s, ub = kr.vq_code_scores(x, cb, slack)
    s_ref, ub_ref = kr.vq_code_scores_ref(x, cb, slack)
    _close(s, s_ref, dtype)
    _close(ub, ub_ref, dtype)
    _close(kr.vq_code_scores(x, cb), s_ref, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_argmax_matches_reference(shape, dtype):
    n, h, v, k = shape
    x, w, _, members, gen = _inputs(n, h, v, k, dtype, seed=1)
    p = min(3, k)
    probes = torch.stack([torch.randperm(k, generator=gen)[:p] for _ in range(n)]).to(DEVICE)
    logits, best, token = kr.vq_probe_argmax(x, w, members, probes)
    logits_ref, best_ref, token_ref = kr.vq_probe_argmax_ref(x, w, members, probes)
    finite = torch.isfinite(logits_ref)
    assert torch.equal(torch.isfinite(logits), finite)
    _close(logits[finite], logits_ref[finite], dtype)
    _close(best, best_ref, dtype)
    # Tokens agree unless two members tie within rounding; then both logits must equal best.
    w_tok = (w[token].float() * x.float()).sum(1)
    _close(w_tok, best_ref, dtype)
    assert (members[probes].long() == token[:, None, None]).flatten(1).any(1).all()  # the winner was probed
    if dtype == torch.float32:
        assert torch.equal(token, token_ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_logits_match_reference(shape, dtype):
    n, h, v, k = shape
    x, w, _, _, _ = _inputs(n, h, v, k, dtype, seed=2)
    proved = (torch.arange(n) % 2 == 1).to(DEVICE, torch.int32)  # mixed: some proved, some not
    out = kr.vq_fallback_logits(x, w, proved, torch.empty(n, v, device=DEVICE, dtype=dtype))
    ref = kr.vq_fallback_logits_ref(x.float(), w.float(), proved, torch.empty(n, v, device=DEVICE))
    p = proved.bool()
    assert torch.isneginf(out[p]).all()
    _close(out[~p], ref[~p], dtype)


def test_wrappers_reject_bad_shapes():
    x, w, cb, members, _ = _inputs(2, 24, 50, 5, torch.float32)
    with pytest.raises(ValueError, match="codebook"):
        kr.vq_code_scores(x, cb[:, :10])
    with pytest.raises(ValueError, match="members must be int32"):
        kr.vq_probe_argmax(x, w, members.long(), torch.zeros(2, 1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="proved"):
        kr.vq_fallback_logits(x, w, torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.empty(2, 50, device=DEVICE))
