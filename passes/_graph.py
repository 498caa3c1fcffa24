"""Graph helpers shared by the passes (not a pass: not listed in PASS_MODULES)."""

from __future__ import annotations

import torch
import torch.fx

from slimfx.compiler.anatomy import BOUND_META


def bind_tensor(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """A `get_attr` node for `tensor`, registered on `gm` as non-persistent buffer `name`
    and inserted before `before`, marked with `BOUND_META` (lowering finds the bound
    tensors by that mark, never by their names). Binding a name the model already uses,
    or one a pass bound to another tensor, is an error: the graph would silently read
    the wrong weights or cache."""
    bound = gm.meta.setdefault(BOUND_META, set())
    if name not in bound:
        if hasattr(gm, name):
            raise RuntimeError(f"graph attribute {name!r} already exists in the model; slimfx cannot bind a tensor under that name")
        gm.register_buffer(name, tensor, persistent=False)
        bound.add(name)
    elif getattr(gm, name) is not tensor:
        raise RuntimeError(f"graph attribute {name} is already bound to another tensor")
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = tensor
    node.meta[BOUND_META] = True
    return node


def graph_input_value(gm: torch.fx.GraphModule, node: torch.fx.Node, example_inputs):
    """The concrete value behind a placeholder (from dynamo's example inputs, in
    placeholder order) or a get_attr node (the module attribute); None otherwise."""
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value
    if node.op != "placeholder":
        return None
    idx = [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)
    return example_inputs[idx] if idx < len(example_inputs) else None
