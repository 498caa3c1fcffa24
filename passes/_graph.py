"""Graph helpers shared by the passes (not a pass: not listed in PASS_MODULES)."""

from __future__ import annotations

import math

import torch
import torch.fx

from slimfx.compiler.anatomy import BOUND_META, is_view_like, shape_of


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


def replace_with_attention(gm: torch.fx.GraphModule, node: torch.fx.Node, site_index: int, args, kwargs=None) -> torch.fx.Node:
    """Replace a site's attention `node` by a slimfx::attention call of `args` (the op must
    be registered: import slimfx.runtime.attention_op). The new node is marked with the
    site's index: later passes (kv_eviction) find the site by that mark."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.slimfx.attention.default, args, kwargs or {})
    new.meta = dict(node.meta)
    new.meta["slimfx_site"] = site_index
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


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


def site_prefix(index: int) -> str:
    return f"_slimfx_kv{index}_"


def bind_site(gm: torch.fx.GraphModule, cache, before: torch.fx.Node) -> list[torch.fx.Node]:
    """`get_attr` nodes for every buffer of `cache`'s tiers (SiteCache.buffers order),
    inserted before `before`. A site a pass gave new tiers (KVStore.relayout) is rebound:
    its graph attributes point at the new buffers, and names its new layout no longer has
    are dropped, so the old buffers' memory is freed with the store's reference."""
    bound = gm.meta.setdefault(BOUND_META, set())
    prefix = site_prefix(cache.index)
    names = [prefix + name.replace(".", "_") for name in cache.fields()]
    for stale in [n for n in bound if n.startswith(prefix) and n not in names]:
        bound.discard(stale)
        gm._buffers.pop(stale, None)
    nodes = []
    for name, tensor in zip(names, cache.buffers()):
        if name in bound and getattr(gm, name) is not tensor:
            gm._buffers[name] = tensor  # the site was relaid out: same name, new buffer
        nodes.append(bind_tensor(gm, name, tensor, before))
    return nodes


def attention_sites(gm: torch.fx.GraphModule) -> list[tuple[int, torch.fx.Node]]:
    """(site index, node) of every slimfx::attention node (kv_runtime marks each with its site)."""
    target = getattr(getattr(torch.ops, "slimfx", None), "attention", None)
    if target is None:
        return []
    return [(n.meta["slimfx_site"], n) for n in gm.graph.nodes
            if n.op == "call_function" and n.target == target.default and "slimfx_site" in n.meta]


def retarget_site(gm: torch.fx.GraphModule, node: torch.fx.Node, cache) -> torch.fx.Node:
    """Point a slimfx::attention node at `cache`'s current buffers and layout (after a pass
    relaid the site out); the get_attr nodes it read before are erased once unused."""
    q, k, v, positions, old, scale, _ = node.args
    node.args = (q, k, v, positions, bind_site(gm, cache, node), scale, cache.layout)
    for dead in old:
        if not dead.users:
            gm.graph.erase_node(dead)
    return node


def relayout_site(gm: torch.fx.GraphModule, store, index: int, layout: str, make_tiers) -> int:
    """Give site `index` the tiers `make_tiers(cache)` builds, read and written as `layout`
    says, unless another graph of this model (a prefill length, the decode step) did
    already; point this graph's nodes of the site and of the sites reading its cache at
    them. Returns the bytes saved."""
    cache = store.sites[index]
    before = cache.nbytes()
    if cache.layout != layout:
        store.relayout(index, layout, make_tiers(cache))
    readers = {c.index for c in store.readers_of(index)}
    for site, node in attention_sites(gm):
        if site == index or site in readers:
            retarget_site(gm, node, store.sites[site])
    return before - cache.nbytes()


def _unrepeat(node: torch.fx.Node | None, n_kv_heads: int) -> torch.fx.Node | None:
    """The [B, Hkv, T, D] tensor behind `node`, walking back through HF's repeat_kv
    (expand + reshape) when the graph repeated the kv heads for SDPA."""
    cur = node
    for _ in range(8):
        if cur is None:
            return None
        shape = shape_of(cur)
        if shape is not None and len(shape) == 4 and shape[1] == n_kv_heads:
            return cur
        if not (is_view_like(cur) and cur.args and isinstance(cur.args[0], torch.fx.Node)):
            return None
        cur = cur.args[0]
    return None


def sdpa_operands(gm: torch.fx.GraphModule, site) -> tuple:
    """(q, k, v) nodes of an attention site, k and v at kv-head width (before repeat_kv); None where not found."""
    by_name = {n.name: n for n in gm.graph.nodes}
    q = by_name.get(site.q_input)
    k = _unrepeat(by_name.get(site.k_input), site.n_kv_heads)
    v = _unrepeat(by_name.get(site.v_input), site.n_kv_heads)
    return q, k, v


def sdpa_scale(node: torch.fx.Node, head_dim: int) -> float:
    """The softmax scale an SDPA call uses (its `scale` argument, else 1/sqrt(head_dim))."""
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
