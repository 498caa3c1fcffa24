"""Random graphs of pointwise ops and last-dim reductions through slimfx codegen vs eager.

Kernels run under the Triton interpreter: TRITON_INTERPRET=1 is set (monkeypatch)
before compile_graph; triton reads it when a generated module is decorated, so an
earlier `import triton` in this process does not matter.

Tolerances (compiled vs eager, same inputs): the kernels compute in fp32 and round each
half-precision result to its dtype as eager does (so comparisons see the same values);
op implementations (exp, rsqrt, reduction order) still differ by an ulp or so:
    float32: atol = rtol = 1e-4     float16: 1e-2     bfloat16: 6e-2
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx.codegen import compile_graph
from slimfx.measure.pointwise_programs import TOL, draw_program, program_fn, trace_program


@st.composite
def programs(draw):
    return draw_program(lambda lo, hi: draw(st.integers(lo, hi)), lambda seq: draw(st.sampled_from(seq)))


@settings(max_examples=int(os.environ.get("SLIMFX_HYPOTHESIS_EXAMPLES", "30")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=programs(), seed=st.integers(0, 2**16))
def test_random_graphs_match_eager(interpreter, case, seed):
    shape, dtype, input_shapes, program = case
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, generator=gen).to(dtype) for s in input_shapes]
    fn = program_fn(program, len(inputs))
    gm = trace_program(fn, len(inputs))
    compiled = compile_graph(gm, inputs)
    expected = fn(*inputs)
    got = compiled(*inputs)
    assert len(got) == len(expected)
    tol = TOL[dtype]
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), atol=tol, rtol=tol)
    # The kernels ran (not the ATen fallback): every group has generated source.
    result = compiled.slimfx_codegen
    assert all(g.source is not None for g in result.groups), [g.error for g in result.groups]


def test_rmsnorm_and_softmax_become_one_row_kernel_each(interpreter):
    x = torch.randn(3, 7, 40)
    w = torch.randn(40)

    def fn(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return torch.softmax(h @ torch.ones(40, 40) * 0.1, -1)

    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w])
    groups = compiled.slimfx_codegen.partition.groups
    assert [g.kind for g in groups] == ["row", "row"]
    assert {str(n.target) for n in groups[0].nodes} >= {"aten.mean.dim", "aten.rsqrt.default"}
    assert {str(n.target) for n in groups[1].nodes} >= {"aten.amax.default", "aten.exp.default", "aten.sum.dim_IntList"}
    torch.testing.assert_close(compiled(x, w)[0] if isinstance(compiled(x, w), tuple) else compiled(x, w), fn(x, w), atol=1e-5, rtol=1e-5)


def test_strided_and_broadcast_inputs(interpreter):
    base = torch.randn(6, 10)
    x = base.t()  # [10, 6], non-contiguous
    b = torch.randn(10, 1)

    def fn(x, b):
        return torch.sigmoid(x + b) * x

    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, b])
    out = compiled(x, b)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, fn(x, b))
    assert out.stride() == fn(x, b).stride()  # outputs keep eager's layout


def test_cpu_without_interpreter_runs_aten_reference(no_interpreter):
    x = torch.randn(4, 9)

    def fn(x):
        return torch.softmax(x * 2.0, -1) + 1.0

    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x])
    out = compiled(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out, fn(x))  # the group's own ATen ops: bit-identical to eager
    assert not (no_interpreter / "kernels").exists()  # nothing was compiled or imported


def test_symbolic_sizes_stay_kernel_arguments(interpreter, codegen_backend):
    """A dynamic dim is a SymInt in the graph: one kernel serves every length."""
    import re

    def fn(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return torch.nn.functional.silu(h) * x

    compiled = torch.compile(fn, backend=codegen_backend, dynamic=True)
    w = torch.randn(24)
    for rows in (3, 5, 11):
        x = torch.randn(2, rows, 24)
        torch.testing.assert_close(compiled(x, w), fn(x, w), atol=1e-5, rtol=1e-5)
    [result] = codegen_backend.results  # no recompile per length
    [source] = [g.source for g in result.groups]
    params = re.search(r"_kernel\((.*)\):", source).group(1)
    assert re.search(r"\bs\d+\b", params), params  # the symbolic size is a kernel argument


@st.composite
def cat_cases(draw):
    """A cat along a random dim of 2-4 pieces; each piece a pointwise chain over a strided
    slice of one input (or the slice itself), one piece times a broadcast weight."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    dim = draw(st.integers(0, ndim - 1))
    pieces = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(2, 4)))]
    ops = [draw(st.sampled_from(["none", "neg", "sigmoid", "scale", "weight"])) for _ in pieces]
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return shape, dim, pieces, ops, dtype


def _cat_fn(dim, pieces, ops):
    def fn(x, w):
        parts, start = [], 0
        for size, op in zip(pieces, ops):
            part = x.narrow(dim, start, size)
            start += size
            if op == "neg":
                part = -part
            elif op == "sigmoid":
                part = torch.sigmoid(part)
            elif op == "scale":
                part = part * 0.5 + 0.25
            elif op == "weight":
                part = part * w
            parts.append(part)
        joined = torch.cat(parts[::-1], dim)  # pieces in another order than x holds them
        return joined * 2.0 + 1.0, torch.tanh(joined)

    return fn


@settings(max_examples=int(os.environ.get("SLIMFX_HYPOTHESIS_EXAMPLES", "30")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cat_cases(), seed=st.integers(0, 2**16))
def test_random_cats_fuse_and_match_eager(interpreter, case, seed):
    _check_random_cat(case, seed, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cat_cases(), seed=st.integers(0, 2**16))
def test_random_cats_on_cuda(no_interpreter, case, seed):
    _check_random_cat(case, seed, "cuda")


def _check_random_cat(case, seed, device):
    shape, dim, pieces, ops, dtype = case
    gen = torch.Generator().manual_seed(seed)
    full = list(shape)
    full[dim] = sum(pieces)
    # Non-contiguous x (a transpose of its storage) and a weight broadcast along `dim`.
    x = torch.randn(full[::-1], generator=gen).to(dtype).permute(*reversed(range(len(full))))
    w_shape = [1] * len(full)
    w_shape[-1] = full[-1] if dim != len(full) - 1 else 1
    w = torch.randn(w_shape, generator=gen).to(dtype)
    if "weight" in ops and dim == len(full) - 1:
        w = torch.randn([1] * len(full), generator=gen).to(dtype)
    x, w = x.to(device), w.to(device)
    fn = _cat_fn(dim, pieces, ops)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w], cudagraphs=False)
    tol = TOL[dtype]
    for e, g in zip(fn(x, w), compiled(x, w)):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), atol=tol, rtol=tol)
    groups = compiled.slimfx_codegen.partition.groups
    # One kernel: the cat, its operands' chains and its consumers.
    assert len(groups) == 1, compiled.slimfx_codegen.partition.summary()
    assert all(g.source is not None for g in compiled.slimfx_codegen.groups)


def test_rotary_embedding_is_one_kernel_per_tensor(interpreter):
    """HF's rotate_half rotary (slice, neg, cat, mul, add) and its cos/sin table
    (cat([freqs, freqs]).cos()/.sin()) each become one kernel, with no ATen cat left."""

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def fn(q, inv_freq, pos):
        freqs = pos[:, :, None] * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        return q * cos + rotate_half(q) * sin

    q = torch.randn(1, 5, 4, 16).transpose(1, 2)  # [batch, heads, tokens, head_dim], strided
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.arange(3, 8).float()[None]
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [q, inv_freq, pos])
    out = compiled(q, inv_freq, pos)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, fn(q, inv_freq, pos), atol=1e-4, rtol=1e-4)
    result = compiled.slimfx_codegen
    assert [g.kind for g in result.partition.groups] == ["pointwise", "pointwise"], result.partition.summary()
    assert "aten.cat" not in result.wrapper.code
