"""Device checks: the CUDA paths of the attention variants (eviction, DuoAttention, MiKV,
KV quantization) against their CPU references and
prefill CUDA graphs against no graphs (marked `cuda`, skipped without a GPU; `pytest -m
cuda` runs only those), and the VQ head's exact mode against the unmodified default model
(runs on any device, given a codebook)."""

from __future__ import annotations

import os

import pytest
import torch


def cuda(test):
    """Marked `cuda` and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# ----------------------------------------------------------------------------- eviction ops

B, HQ, HKV, D, PROMPT, STEPS, CAP = 2, 8, 2, 64, 300, 40, 96


@pytest.fixture(scope="module")
def qkv():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, h, PROMPT + STEPS, D, generator=gen) for h in (HQ, HKV, HKV))


def run_evict(device, policy, q, k, v, prefill_slots=0):
    """A PROMPT-token prefill then single-token decode steps: outputs and the kept positions."""
    from slimfx.passes.kv_eviction.eviction_op import evict_site

    param = {"snapkv": 16.0, "h2o-mean": 1.0}.get(policy, 0.9)  # h2o-mean: H2O with mass = "mean"
    cache = evict_site(B, HKV, CAP, D, policy=policy.removesuffix("-mean"), n_sink=4, window=16, param=param,
                       prefill_slots=prefill_slots, device=device)
    return _feed(device, cache, q, k, v)


def run_duo(device, q, k, v):
    """Kv head 0 keeps the full store (retrieval), kv head 1 sinks + recent (streaming)."""
    from slimfx.passes.kv_eviction.duo_op import duo_site

    cache = duo_site(B, [0], [1], k.shape[2], CAP, D, n_sink=4, window=16, device=device)
    return _feed(device, cache, q, k, v)


def run_mikv(device, fmt, q, k, v):
    """h2o over a 96-slot main tier; evicted tokens demoted to a low tier in `fmt`."""
    from slimfx.passes.kv_eviction.mikv_op import mikv_site

    cache = mikv_site(B, HKV, CAP, k.shape[2], D, policy="h2o", n_sink=4, window=16, fmt=fmt, device=device)
    return _feed(device, cache, q, k, v)


def run_kvq(device, fmt, q, k, v):
    """Quantize-on-write store (sinks 4, recent 32 at full precision), capacity for everything."""
    from slimfx.passes.kv_quantize.op import kvq_site
    from slimfx.runtime.kv_store import plain_site

    cache = kvq_site(plain_site(B, HKV, k.shape[2], D, device=device), fmt, group=32, residual=32, n_sink=4)
    return _feed(device, cache, q, k, v)


def _feed(device, cache, q, k, v):
    """Through the op (Triton on CUDA, references on the CPU): outputs and the main tier's positions."""
    q, k, v = q.to(device), k.to(device), v.to(device)
    spans = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, q.shape[2])]
    outs = [torch.ops.slimfx.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.arange(a, b, device=device).expand(B, b - a),
                                       cache.buffers(), D ** -0.5, cache.layout) for a, b in spans]
    return torch.cat(outs, 2).cpu(), cache.slot_pos.cpu()


def assert_same(gpu, cpu):
    (out_gpu, pos_gpu), (out_cpu, pos_cpu) = gpu, cpu
    err = ((out_gpu - out_cpu).norm() / out_cpu.norm()).item()
    assert err <= 2e-3, f"rel err {err:.2e}"  # fp32 dots run as tf32 on the GPU
    for b in range(pos_cpu.shape[0]):
        for h in range(pos_cpu.shape[1]):
            assert set(pos_gpu[b, h].tolist()) == set(pos_cpu[b, h].tolist()), f"kept slots differ at batch {b}, kv head {h}"


def _policies():
    from slimfx.passes.kv_eviction.policies import POLICIES

    return [*POLICIES, "h2o-mean"]


@cuda
@pytest.mark.parametrize("policy", _policies())
def test_evict_cuda_matches_cpu(policy, qkv):
    assert_same(run_evict("cuda", policy, *qkv), run_evict("cpu", policy, *qkv))


@cuda
@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_evict_scope_cuda_matches_cpu(policy, qkv):
    # SCOPE: 64 slots for the prompt's selection, the rest for decoding.
    assert_same(run_evict("cuda", policy, *qkv, prefill_slots=64), run_evict("cpu", policy, *qkv, prefill_slots=64))


@cuda
def test_duo_cuda_matches_cpu(qkv):
    assert_same(run_duo("cuda", *qkv), run_duo("cpu", *qkv))


@cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_mikv_cuda_matches_cpu(fmt, qkv):
    assert_same(run_mikv("cuda", fmt, *qkv), run_mikv("cpu", fmt, *qkv))


@cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_kvq_cuda_matches_cpu(fmt, qkv):
    # Codes may differ by one where the GPU's division rounds differently: compare outputs only.
    gpu, cpu = run_kvq("cuda", fmt, *qkv), run_kvq("cpu", fmt, *qkv)
    err = ((gpu[0] - cpu[0]).norm() / cpu[0].norm()).item()
    assert err <= 5e-3, f"rel err {err:.2e}"


# ----------------------------------------------------------------------------- prefill CUDA graphs


@cuda
def test_prefill_cudagraphs_keep_tokens(monkeypatch):
    """Prefill chunks replayed from CUDA graphs give the tokens of no graphs, for each
    codegen, on a tiny random Llama with a prompt of several chunks and left padding; in
    fp32 every codegen gives the eager codegen's tokens (kernels differ by rounding only)."""
    from slimfx.measure.shapes import build
    from slimfx.runtime.generate import generate

    torch.manual_seed(0)
    model = build("tiny", torch.float32, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 70), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding

    def tokens(codegen, graphs):
        monkeypatch.setenv("SLIMFX_CUDAGRAPHS", "1" if graphs else "0")
        torch._dynamo.reset()
        kw = dict(attention_mask=mask, max_new_tokens=8, prefill_chunk=16, codegen=codegen)
        generate(model, ids, **kw)  # compile, warm
        return generate(model, ids, **kw).tokens

    eager = None
    for codegen in ("eager", "inductor", "slimfx"):
        got = tokens(codegen, graphs=True)
        assert torch.equal(tokens(codegen, graphs=False), got), f"{codegen}: prefill CUDA graphs change the tokens"
        eager = got if eager is None else eager
        assert torch.equal(got, eager), f"{codegen}: tokens differ from the eager codegen's"


# ----------------------------------------------------------------------------- VQ head exact mode

VQ_PROMPTS = [
    "Explain how a bicycle works in two sentences.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Describe the water cycle to a ten-year-old.",
]


@pytest.mark.model
@pytest.mark.skipif(not os.environ.get("SLIMFX_VQ_CODEBOOK"), reason="set SLIMFX_VQ_CODEBOOK to a codebook from `slimfx calibrate vq-head`")
@pytest.mark.parametrize("verify", ["bound", "deferred"])
def test_vq_exact_matches_unmodified_model(verify, default_model):
    """Greedy tokens of the VQ head's exact mode equal the unmodified model's, by both
    verification routes: the bound with a same-step full-head fallback, and deferred
    batched verification with KV rollback. The codebook comes from
    `slimfx calibrate vq-head --k 1024 --out PATH`, named by SLIMFX_VQ_CODEBOOK."""
    codebook = os.environ["SLIMFX_VQ_CODEBOOK"]
    from slimfx.runtime.generate import generate
    from slimfx.runtime.models import chat_input_ids
    from slimfx.runtime.vq_verify import generate_verified

    model, tok = default_model
    new = int(os.environ.get("SLIMFX_VQ_TOKENS", "128"))
    config = {"compile": {"pipeline": "vq"}, "pipelines": {"vq": ["vq_logits"]},
              "passes": {"vq_logits": {"mode": "exact", "codebook": "vq_head", "probes": 8, "verify": verify, "verify_every": 8}},
              "artifacts": {"vq_head": codebook}}
    for prompt in VQ_PROMPTS:
        ids = chat_input_ids(tok, prompt)
        ref = generate(model, ids, max_new_tokens=new).tokens
        if verify == "bound":
            out = generate(model, ids, max_new_tokens=new, config=config).tokens
        else:
            out = generate_verified(model, ids, config=config, max_new_tokens=new).tokens
        assert torch.equal(out, ref), f"{prompt!r}: first difference at token {int((out != ref).nonzero()[0, 1])}"
