"""Bound tensors become graph inputs, so in-place writes to them survive lowering.

The `kv_runtime` pass leaves the store's buffers in the graph as attributes
(`get_attr` nodes) that `slimfx::attention` mutates in place. Run as FX code that is
exact, but every ATen op is its own kernel (RMSNorm, RoPE, SiLU*mul: ~40 launches per
layer), which even inside a CUDA graph costs more than the weights' bytes at batch 1.

Inductor fuses those, but treats graph attributes as constants, so an in-place write
to one would not reach the store. `lower_with_inductor` therefore turns every store
buffer into a graph *input* (AOTAutograd then keeps the op's declared mutation and
writes through to the caller's tensor) and passes the store's tensors on each call;
`compile_store_graph` (codegen/__init__.py) does the same for slimfx's own code
generation. Addresses stay fixed, so the step remains CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import torch.fx

from slimfx.compiler.anatomy import BOUND_META


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

