"""Lowering, partitioning and the generated wrapper: structure and numerics.

Kernels run under the Triton interpreter where a test sets TRITON_INTERPRET=1; tests
that set it to 0 check the CPU path (each group runs its own ATen nodes: exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx

from slimfx.codegen import compile_graph
from slimfx.codegen.lower import lower_to_aten


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_merge_that_would_create_a_cycle_is_refused(interpreter):
    # a -> mm -> c and a -> c: fusing a with c would need mm both before and after.
    def fn(x, w):
        a = torch.sigmoid(x + 1.0)
        b = a @ w
        return a * b

    x, w = torch.randn(5, 8), torch.randn(8, 8)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w])
    groups = compiled.slimfx_codegen.partition.groups
    assert len(groups) == 2
    targets = [{str(n.target) for n in g.nodes} for g in groups]
    # The mul may join the matmul's epilogue (no cycle), never the sigmoid's group
    # (sigmoid -> mm -> mul would leave and re-enter it).
    assert "aten.sigmoid.default" in targets[0] and "aten.mul.Tensor" not in targets[0]
    assert targets[1] == {"aten.mm.default", "aten.mul.Tensor"}
    torch.testing.assert_close(_first(compiled(x, w)), fn(x, w))


def test_no_fusion_across_an_in_place_write(interpreter):
    # y reads buf before the write, z after it: the write must stay between them.
    def fn(x, buf, idx):
        y = buf * 2.0 + 1.0
        buf.index_copy_(0, idx, x)
        z = buf * 3.0 + y
        return z

    x, idx = torch.randn(2, 6), torch.tensor([1, 3])
    buf_a = torch.randn(4, 6)
    buf_b = buf_a.clone()
    gm = torch.fx.symbolic_trace(fn)
    compiled = compile_graph(gm, [x, buf_a.clone(), idx])
    got = _first(compiled(x, buf_a, idx))
    expected = fn(x, buf_b, idx)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(buf_a, buf_b)  # the write reached the caller's tensor
    groups = compiled.slimfx_codegen.partition.groups
    assert len(groups) == 2  # one group before the write, one after


def test_custom_ops_stay_single_nodes(no_interpreter):
    import slimfx.passes.quantize.op  # noqa: F401 - registers torch.ops.slimfx.qlinear_int8

    def fn(x, q, s):
        return torch.nn.functional.silu(torch.ops.slimfx.qlinear_int8(x, q, s, None)) * 2.0

    x = torch.randn(3, 16)
    q = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    s = torch.rand(8) * 0.01
    aten_gm = lower_to_aten(torch.fx.symbolic_trace(fn), [x, q, s])
    custom = [n for n in aten_gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("slimfx.")]
    assert [str(n.target) for n in custom] == ["slimfx.qlinear_int8.default"]
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, q, s])
    assert torch.equal(_first(compiled(x, q, s)), fn(x, q, s))


def test_debug_dir_gets_readable_sources(interpreter, monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFX_DEBUG_DIR", str(tmp_path / "dbg"))

    def fn(x):
        return torch.softmax(x, -1) * x

    compile_graph(torch.fx.symbolic_trace(fn), [torch.randn(3, 5)])
    [folder] = list((tmp_path / "dbg").iterdir())
    names = {p.name for p in folder.iterdir()}
    assert {"aten_graph.py", "partition.txt", "wrapper.py"} <= names
    kernels = [p for p in folder.iterdir() if p.name.startswith("row_")]
    assert kernels and "@triton.jit" in kernels[0].read_text()


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="must be a torch.fx.GraphModule"):
        compile_graph(lambda x: x, [torch.randn(2)])


# ----------------------------------------------------------------------------- a tiny HF Llama


def _tiny():
    from slimfx.runtime.models import tiny_model

    return tiny_model("llama_gqa")


def _eager_and_slimfx_logits(ids):
    """The tiny Llama's logits for `ids`, eager and through backend="slimfx" with codegen."""
    model = _tiny()
    options = {"config": {"compile": {"codegen": "slimfx"}}}
    with torch.no_grad():
        return model(ids).logits, torch.compile(model, backend="slimfx", options=options)(ids).logits


def test_tiny_llama_through_kernels_matches_eager(interpreter):
    expected, got = _eager_and_slimfx_logits(torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _tiny_llama_codegen(backend, ids):
    """The CodegenResult of the tiny Llama's one graph, run on `ids`."""
    with torch.no_grad():
        torch.compile(_tiny(), backend=backend)(ids)
    [result] = backend.results
    return result


def test_each_layers_groups_share_one_kernel_module(interpreter, codegen_backend):
    """Groups are named by content, not by group id: the same group in both decoder layers
    is one source (one module import, one Triton compile), and the layers' groups differ
    from each other only where their ops do."""
    result = _tiny_llama_codegen(codegen_backend, torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0)))
    sources = [g.source for g in result.groups]
    assert all(sources)
    # Two layers: every per-layer group (norms, rotary, projections) appears twice.
    assert len(set(sources)) < len(sources)
    rotary = [g.source for g in result.groups if "cat" in g.group.name and "neg" in g.group.name]
    assert len(rotary) == 4 and len(set(rotary)) == 2  # q and k of each layer; one source each


def test_tiny_llama_partition_fuses_norms_rope_and_mlp(interpreter, codegen_backend):
    result = _tiny_llama_codegen(codegen_backend, torch.randint(0, 128, (1, 5)))
    kinds = [g.kind for g in result.partition.groups]
    assert kinds.count("row") == 2 * 2 + 1  # two RMSNorms per layer + the final norm
    assert all(g.source is not None for g in result.groups)
    mlp = [g for g in result.partition.groups if any(str(n.target) == "aten.sigmoid.default" for n in g.nodes)]
    assert len(mlp) == 2 and all(len(g.nodes) >= 3 for g in mlp)  # x*sigmoid(x)*up per layer


def test_tiny_llama_cpu_path_is_bit_identical(no_interpreter):
    expected, got = _eager_and_slimfx_logits(torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(got, expected)


@pytest.mark.model
def test_default_model_tokens_identical_through_codegen(default_model, no_interpreter):
    """SmolLM2-135M, passes off, codegen=slimfx on CPU: logits bit-identical to eager, so
    the greedy token at every prompt position (and the next token) is eager's.
    One compile (~1 min on 2 CPU cores); the compiled kernels are checked on the GPU."""
    model, tokenizer = default_model
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    options = {"config": {"compile": {"codegen": "slimfx", "pipeline": "off"}}}
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        got = torch.compile(model, backend="slimfx", options=options)(ids, use_cache=False).logits
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_generator_decode_with_store_graph_matches_eager_codegen(interpreter, monkeypatch):
    """The KV-runtime decode path (slimfx::attention writing the store in place) through
    codegen='slimfx' (compile_store_graph) gives the tokens the FX ('eager') lowering gives."""
    import importlib

    import slimfx.codegen as codegen

    gen = importlib.import_module("slimfx.runtime.generate")
    built = []
    original = codegen.compile_store_graph

    def recording(gm, example_inputs, **kw):
        fn = original(gm, example_inputs, **kw)
        built.append(fn.slimfx_codegen)
        return fn

    monkeypatch.setattr(codegen, "compile_store_graph", recording)
    model = _tiny()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = gen.generate(model, ids, max_new_tokens=5, codegen="eager").tokens
    got = gen.generate(model, ids, max_new_tokens=5, codegen="slimfx").tokens
    assert torch.equal(got, expected)
    assert built and all(g.source is not None for result in built for g in result.groups)
    attention = [n for result in built for n in result.aten_graph.graph.nodes if str(n.target) == "slimfx.attention.default"]
    assert attention  # the custom op stayed one node
