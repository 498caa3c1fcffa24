"""Remove dtype/device conversions that convert nothing (lossless).

HF models cast the residual stream and norms with `.to(dtype)` on every block; when
the tensor already has that dtype and device the call is the identity, and removing
it gives later fusion a cleaner graph. Needs `example_value` metadata (dynamo graphs
have it); nodes without it are left alone.
"""

from __future__ import annotations

import torch
import torch.fx

from slimfx.compiler.passmanager import PassContext, PassResult

NAME = "fold_noop_casts"
DESCRIPTION = "removes .to()/.float()/.type_as() calls that do not change dtype or device"
LOSSY = False
OPTIONS: dict = {}

# `.contiguous()` is left alone: whether it copies depends on strides, which the
# dtype/device check below cannot see.
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type_as"}


def _meta(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_noop_cast(node: torch.fx.Node) -> bool:
    if node.op != "call_method" or node.target not in _CAST_METHODS or not node.args:
        return False
    src, out = _meta(node.args[0]), _meta(node)
    if src is None or out is None:
        return False
    # A `.to(..., copy=True)` or a memory-format change is not the identity.
    if node.kwargs.get("copy") or "memory_format" in node.kwargs:
        return False
    return src.dtype == out.dtype and src.device == out.device and tuple(src.shape) == tuple(out.shape)


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    casts = [n for n in gm.graph.nodes if _is_noop_cast(n)]
    if not casts:
        return PassResult.skipped(NAME, "no no-op casts in the graph")
    for node in casts:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return PassResult(NAME, applied=True, sites_matched=len(casts), nodes_rewritten=len(casts))
