"""Graph helpers shared by the passes (not a pass: not listed in PASS_MODULES)."""

from __future__ import annotations

import torch
import torch.fx


def bind_tensor(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """A `get_attr` node for `tensor`, registered on `gm` as non-persistent buffer `name`
    and inserted before `before`. Binding the same name to another tensor is an error:
    the graph would silently read the wrong weights or cache."""
    if not hasattr(gm, name):
        gm.register_buffer(name, tensor, persistent=False)
    elif getattr(gm, name) is not tensor:
        raise RuntimeError(f"graph attribute {name} is already bound to another tensor")
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = tensor
    return node
