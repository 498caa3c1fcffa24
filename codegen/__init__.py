"""slimfx code generation: the rewritten graph -> fused Triton kernels + ATen calls.

    compile_graph(gm, example_inputs, *, cudagraphs=None) -> callable(*example_inputs-like)

Pipeline:
1. lower.lower_to_aten: dynamo graph -> ATen graph (make_fx over dynamo's fake
   tensors, a few decompositions; custom ops `torch.ops.slimfx.*` stay single nodes;
   in-place cache writes stay in place).
2. partition.partition: networkx fusion groups (pointwise chains; row groups with
   last-dim reductions such as RMSNorm and softmax; matmul groups: an mm/addmm with
   its pointwise epilogue), never across a mutation.
3. triton_gen (matmul_gen for matmul groups): one Triton module + host wrapper per
   group, written to the kernel cache, imported, launched with configs from the
   autotuner (autotune.py), which for a matmul also measures the library call.
4. The wrapper: an FX GraphModule that calls each group's kernel and runs every
   other node (a matmul without epilogue off CUDA, SDPA, views, custom ops) as the
   ATen call it is.
5. cudagraphs: on CUDA, when all inputs are tensors of static shape (the decode step
   with a static KV cache), the step is captured and replayed as a CUDA graph.

Where kernels run:
- CUDA tensors: compiled Triton kernels.
- CPU with TRITON_INTERPRET=1 (set before compile_graph): the same kernels through
  the Triton interpreter (slow; what the tests use).
- CPU otherwise: nothing is decomposed and each group runs its own ATen nodes
  (`CompiledGroup.reference`), so the result is bit-identical to eager and nothing
  needs a GPU.
If the graph cannot be lowered at all, compile_graph warns and returns the FX graph's
own forward (ATen calls), so a lowering gap costs speed, never a failure.

$SLIMFX_DEBUG_DIR: each compiled graph writes codegen_<n>/ there with the ATen graph,
the partition, the wrapper's Python code and every generated kernel module.
$SLIMFX_CUDAGRAPHS=0 turns CUDA graphs off. $SLIMFX_GQA_DECODE=0 keeps decode SDPA over a
repeated KV cache as written (gqa_decode.py; on CUDA it is otherwise one kernel over the cache). $SLIMFX_MATMUL=auto|all|fused|off picks
which matmuls become template groups (partition.py).
"""

from __future__ import annotations

import itertools
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx

from slimfx.codegen.gqa_decode import rewrite_gqa_decode
from slimfx.codegen.lower import LoweringError, lower_to_aten
from slimfx.codegen.ops import is_mutating
from slimfx.codegen.partition import FusionGroup, Partition, partition
from slimfx.codegen.triton_gen import CompiledGroup, interpreter_on

__all__ = ["compile_graph", "compile_store_graph", "CodegenResult"]

_COUNTER = itertools.count()


@dataclass
class CodegenResult:
    """What compile_graph built (attached to the returned callable as `.slimfx_codegen`)."""

    aten_graph: torch.fx.GraphModule
    partition: Partition
    groups: list  # CompiledGroup per fusion group
    wrapper: torch.fx.GraphModule
    cudagraph: object | None = None

    def group_inputs(self, group: FusionGroup, args) -> list:
        """The values `group` reads when the graph runs on `args`, such as w.t() for a linear's
        weight: what its kernel is called with (to time or check one kernel alone)."""
        values = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, node):
                values[node] = super().run_node(node)
                return values[node]

        Recorder(self.aten_graph).run(*args)
        return [values[node] for node in group.inputs]


def _group_callable(compiled: CompiledGroup):
    def run_group(*inputs):
        return compiled(*inputs)

    # FX names the call after the function; a readable name makes the wrapper readable.
    run_group.__name__ = run_group.__qualname__ = compiled.group.name
    run_group.__module__ = "slimfx_kernels"
    return run_group


def build_wrapper(aten_gm: torch.fx.GraphModule, part: Partition, compiled: dict) -> torch.fx.GraphModule:
    """An FX GraphModule running `part.steps` in order: kernels for groups, ATen for the rest."""
    graph = torch.fx.Graph()
    env: dict = {}
    for step in part.steps:
        if isinstance(step, FusionGroup):
            call = graph.call_function(_group_callable(compiled[step.gid]), tuple(env[n] for n in step.inputs))
            for j, node in enumerate(step.outputs):
                env[node] = graph.call_function(operator.getitem, (call, j))
                env[node].meta = dict(node.meta)
        else:
            env[step] = graph.node_copy(step, lambda n: env[n])
    wrapper = torch.fx.GraphModule(aten_gm, graph)
    wrapper.recompile()
    return wrapper


def mutated_inputs(aten_gm: torch.fx.GraphModule) -> set[int]:
    """Indices of placeholders that some node writes in place (through views too)."""
    placeholders = {n: i for i, n in enumerate(n for n in aten_gm.graph.nodes if n.op == "placeholder")}
    out = set()
    for node in aten_gm.graph.nodes:
        if node.op != "call_function" or not is_mutating(node):
            continue
        schema = node.target._schema
        for arg_schema, arg in zip(schema.arguments, node.args):
            if arg_schema.alias_info is None or not arg_schema.alias_info.is_write:
                continue
            base = arg
            while isinstance(base, torch.fx.Node) and base.op == "call_function" and base.args and _returns_alias(base):
                base = base.args[0]
            if base in placeholders:
                out.add(placeholders[base])
    return out


def _returns_alias(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def _dump(result: CodegenResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "aten_graph.py").write_text(result.aten_graph.code)
    (folder / "partition.txt").write_text(result.partition.summary() + "\n")
    (folder / "wrapper.py").write_text(result.wrapper.code)
    for g in result.groups:
        text = g.source if g.source is not None else f"# no kernel ({g.error}); runs as ATen:\n{g.reference.code}"
        (folder / f"{g.group.name}.py").write_text(text)


def use_cudagraphs(example_inputs, requested: bool | None = None) -> bool:
    """CUDA-graph replay applies: not turned off (argument or SLIMFX_CUDAGRAPHS=0) and every
    input is a CUDA tensor (static shapes; SymInts mean a dynamic graph)."""
    if requested is False or os.environ.get("SLIMFX_CUDAGRAPHS", "1") == "0":
        return False
    return bool(example_inputs) and all(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs)


def compile_graph(gm: torch.fx.GraphModule, example_inputs, *, cudagraphs: bool | None = None, traced_inputs: int | None = None):
    """Compile the rewritten graph `gm` to a callable with the same signature and outputs.

    example_inputs: what dynamo passes (tensors and SymInts). cudagraphs: None = on
    for CUDA graphs whose inputs are all tensors (static shapes), False = off.
    traced_inputs: how many leading inputs dynamo traced, when the caller appended more.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"compile_graph: gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    # Decompose (softmax -> amax/exp/sum/div, ...) only where the pieces become kernels.
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs)
    kernels = interpreter_on() or on_cuda
    if on_cuda and os.environ.get("SLIMFX_GQA_DECODE", "1") != "0":
        rewrite_gqa_decode(gm)  # decode SDPA over repeat_kv -> one kernel over the cache
    try:
        aten_gm = lower_to_aten(gm, list(example_inputs), decompose=kernels, traced_inputs=traced_inputs)
    except LoweringError as exc:
        warnings.warn(f"slimfx codegen: {exc}; running the graph's ATen calls unfused", stacklevel=2)
        return gm.forward
    part = partition(aten_gm)
    # Sources are generated where kernels run, or when asked to dump them.
    generate_source = kernels or bool(os.environ.get("SLIMFX_DEBUG_DIR"))
    compiled = {g.gid: CompiledGroup(g, generate_source=generate_source) for g in part.groups}
    wrapper = build_wrapper(aten_gm, part, compiled)
    result = CodegenResult(aten_gm, part, list(compiled.values()), wrapper)
    debug = os.environ.get("SLIMFX_DEBUG_DIR")
    if debug:
        _dump(result, Path(debug) / f"codegen_{next(_COUNTER)}")

    def run(*args):
        with torch.no_grad():
            return wrapper(*args)

    step = run
    if use_cudagraphs(example_inputs, cudagraphs):
        from slimfx.codegen.cudagraphs import CudaGraphStep, parameter_inputs

        static = mutated_inputs(aten_gm) | parameter_inputs(example_inputs)
        result.cudagraph = CudaGraphStep(run, static)
        step = result.cudagraph

    def compiled_fn(*args):
        return step(*args)

    compiled_fn.slimfx_codegen = result
    return compiled_fn


def compile_store_graph(gm: torch.fx.GraphModule, example_inputs, *, cudagraphs: bool | None = False):
    """compile_graph for the generator's kv_runtime graphs (runtime/lowering.py).

    The KV store's buffers are `get_attr` nodes that `slimfx::attention` writes in place;
    they become trailing graph inputs (same addresses every call) so the ATen graph
    sees them as tensors it mutates. CUDA graphs are off by default: the generator
    captures its whole decode step itself.
    """
    from slimfx.codegen.store_inputs import lift_store_buffers

    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    plain = torch.fx.GraphModule(gm, graph)
    buffers = lift_store_buffers(plain)
    compiled = compile_graph(plain, list(example_inputs) + buffers, cudagraphs=cudagraphs, traced_inputs=len(example_inputs))

    def run(*args):
        return compiled(*args, *buffers)

    run.slimfx_codegen = getattr(compiled, "slimfx_codegen", None)
    return run
