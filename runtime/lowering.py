"""How the generator lowers a graph bound to a KV store.

The `kv_runtime` pass leaves the store's buffers in the graph as attributes
(`get_attr` nodes) that `slimfx::attention` mutates in place. Run as FX code that is
exact, but every ATen op is its own kernel (RMSNorm, RoPE, SiLU*mul: ~40 launches per
layer), which even inside a CUDA graph costs more than the weights' bytes at batch 1.

Inductor fuses those, but treats graph attributes as constants, so an in-place write
to one would not reach the store. `lower_with_inductor` therefore turns every store
buffer into a graph *input* (AOTAutograd then keeps the op's declared mutation and
writes through to the caller's tensor) and passes the store's tensors on each call.
Addresses stay fixed, so the step remains CUDA-graph capturable by the generator.
"""

from __future__ import annotations

import torch
import torch.fx

BOUND_META = "slimfx_bound"  # set by passes._graph.bind_tensor on every tensor a pass binds


def has_bound_tensors(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "get_attr" and n.meta.get(BOUND_META) for n in gm.graph.nodes)


def lift_store_buffers(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Replace get_attr nodes of store buffers by trailing placeholders; returns their tensors
    in placeholder order (the extra arguments the graph now takes)."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    tensors: list[torch.Tensor] = []
    lifted: dict[str, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr" or not node.meta.get(BOUND_META):
            continue
        if node.target not in lifted:
            with graph.inserting_after(last):
                ph = graph.placeholder(f"{node.target}_arg")
            ph.meta = dict(node.meta)
            lifted[node.target] = last = ph
            tensors.append(getattr(gm, node.target))
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    for name in lifted:  # no longer attributes: AOTAutograd would look for their dynamo source
        gm._buffers.pop(name, None)
        if hasattr(gm, name):
            delattr(gm, name)
    graph.lint()
    gm.recompile()
    return tensors


def lower_with_inductor(gm: torch.fx.GraphModule, example_inputs):
    """Compile a kv_runtime-rewritten graph with inductor, store buffers as inputs."""
    from torch._inductor.compile_fx import compile_fx

    # Work on a copy: dynamo still reads its own graph's placeholders after the backend
    # returns. The copy is a plain GraphModule without dynamo's metadata, so AOTAutograd
    # does not look up a dynamo source for the lifted buffers (they have none).
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    plain = torch.fx.GraphModule(gm, graph)
    buffers = lift_store_buffers(plain)
    compiled = compile_fx(plain, list(example_inputs) + buffers)

    def run(*args):
        return compiled(*args, *buffers)

    return run


def runtime_backend(config: dict, codegen: str):
    """A dynamo backend: the slimfx passes (incl. kv_runtime) then `codegen` ('eager' | 'inductor' | 'slimfx')."""
    from slimfx.compiler.backend import slimfx_backend

    def backend(gm, example_inputs, **_):
        forward = slimfx_backend(gm, example_inputs, options={"config": config})
        if codegen == "eager":
            return with_prefill_cudagraph(forward, example_inputs)
        if codegen == "slimfx":
            from slimfx.codegen import compile_store_graph

            return with_prefill_cudagraph(compile_store_graph(gm, example_inputs), example_inputs)
        return with_prefill_cudagraph(lower_with_inductor(gm, example_inputs), example_inputs)

    return backend


def is_prefill_graph(example_inputs) -> bool:
    """A prefill-chunk graph: its token ids / positions (2-D int64 inputs) carry more than
    one token per sequence. The decode step's carry exactly one."""
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() == 2 and a.shape[1] > 1
               for a in example_inputs)


def with_prefill_cudagraph(run, example_inputs):
    """On CUDA, replay prefill-chunk graphs from CUDA graphs (codegen/cudagraphs.py).

    Why: a prefill chunk launches every kernel of the model once from Python; measured on
    the H100 (benchmarks/profile_runtime_prefill.py, Llama-3.2-1B shape, 4K prompt) the
    host took 357 ms for 45 ms of GPU work. Every chunk of a prompt has the same shapes
    and the store's buffers keep their addresses, so one captured graph serves them all.
    The decode step is left alone: the generator captures its whole step itself.
    SLIMFX_CUDAGRAPHS=0 turns this off."""
    from slimfx.codegen import use_cudagraphs

    if not (is_prefill_graph(example_inputs) and use_cudagraphs(example_inputs)):
        return run
    from slimfx.codegen.cudagraphs import CudaGraphStep, parameter_inputs

    # Parameters are used where they are; ids and positions are copied into the graph's
    # buffers each call. The store's buffers are not arguments here (bound inside `run`).
    return CudaGraphStep(run, parameter_inputs(example_inputs))
