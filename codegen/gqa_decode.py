"""Decode-time SDPA over a repeated (GQA) KV cache -> one split-KV kernel over the cache itself.

HF models (transformers' `repeat_kv`) and many hand-written ones feed SDPA keys and
values repeated to the query heads:

    key = cache_k[:, :, None, :, :].expand(B, Hkv, rep, L, D).reshape(B, Hkv * rep, L, D)
    out = scaled_dot_product_attention(q, key, value, attn_mask=mask_bool, ...)

Lowered as written, every decode step copies the whole cache `rep` times per layer before
attention reads it again (on the H100 at 16K context, Llama-3.2-1B shape: 2.6 of 4.8 ms of
kernel time, results/bench_h100_codegen_16k.json). `rewrite_gqa_decode` replaces such an
SDPA, when the query is one token, by `slimfx::gqa_decode_attention(q, cache_k, cache_v,
mask, scale)`, which on CUDA runs the runtime's split-KV decode kernel
(codegen/kernels/decode_attention.py) over the un-repeated cache: the bytes read are the
cache once, and nothing is written but the output.

Applies only where the result is provably the same attention:
- the query has one position (static shape), dropout 0, not causal, no `enable_gqa`;
- keys and values are exactly the repeat pattern above (checked on the graph's shapes);
- the mask is None or boolean, broadcast over heads and the query position
  ([B or 1, 1, 1, L]); a float mask could carry biases the kernel does not add.
Anything else stays an SDPA call. The kernel accumulates in fp32 like SDPA's kernels; a
query that sees no key gives zeros where SDPA gives NaN.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F

from slimfx.codegen.kernels import use_attention_kernels

_SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_REPEAT_INDEX = (slice(None), slice(None), None, slice(None), slice(None))


@torch.library.custom_op("slimfx::gqa_decode_attention", mutates_args=())
def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v [B, Hkv, L, D] (Hq a multiple of Hkv); mask bool [B or 1, 1, 1, L]
    (True = attend) or None. Returns [B, Hq, 1, D] in q's dtype."""
    if not use_attention_kernels(q):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    from slimfx.codegen.kernels.decode_attention import decode_attention

    B, Hkv, L = k.shape[0], k.shape[1], k.shape[2]
    # The kernel's visibility rule is slot_pos in [0, q_pos]: visible keys get position 0,
    # masked ones -1, and the query sits at position 0.
    if mask is None:
        slot_pos = torch.zeros(1, 1, L, dtype=torch.int32, device=q.device)
    else:
        slot_pos = torch.where(mask[:, 0, 0, :], 0, -1).to(torch.int32)[:, None, :]
    slot_pos = slot_pos.expand(B, Hkv, L)
    q_pos = torch.zeros(B, dtype=torch.int64, device=q.device)
    return decode_attention(q[:, :, 0], k, v, slot_pos, q_pos, scale=scale).unsqueeze(2)


@gqa_decode_attention.register_fake
def _gqa_decode_attention_fake(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _repeat_source(node) -> torch.fx.Node | None:
    """The un-repeated cache X when `node` is X[:, :, None].expand(B, Hkv, rep, L, D).reshape(B, Hkv*rep, L, D)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    index = expand.args[0]
    if not (isinstance(index, torch.fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and index.args[1] == _REPEAT_INDEX):
        return None
    src = index.args[0]
    x, e, r = _value(src), _value(expand), _value(node)
    if x is None or e is None or r is None or x.dim() != 4:
        return None
    B, Hkv, L, D = x.shape
    rep = e.shape[2]
    if tuple(e.shape) != (B, Hkv, rep, L, D) or tuple(r.shape) != (B, Hkv * rep, L, D):
        return None
    return src


def _sdpa_args(node: torch.fx.Node) -> dict | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    if len(node.args) > len(names):
        return None
    args = dict(defaults, **dict(zip(names, node.args)), **node.kwargs)
    return args if set(args) <= set(names) else None


def _mask_ok(mask, q: torch.Tensor, L: int) -> bool:
    if mask is None:
        return True
    m = _value(mask)
    return (m is not None and m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1
            and m.shape[3] == L and m.shape[0] in (1, q.shape[0]))


def _decode_site(node: torch.fx.Node):
    """(q, cache_k, cache_v, mask, scale) when `node` is an SDPA this rewrite may replace."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    args = _sdpa_args(node)
    if args is None or args["dropout_p"] != 0.0 or args["is_causal"] or args["enable_gqa"]:
        return None
    q = _value(args["query"])
    k_src, v_src = _repeat_source(args["key"]), _repeat_source(args["value"])
    if q is None or k_src is None or v_src is None or q.dim() != 4 or q.shape[2] != 1:
        return None
    k = _value(k_src)
    if _value(v_src).shape != k.shape or not _mask_ok(args["attn_mask"], q, k.shape[2]):
        return None
    scale = args["scale"]
    if not isinstance(scale, (int, float, type(None))):
        return None
    return args["query"], k_src, v_src, args["attn_mask"], float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def rewrite_gqa_decode(gm: torch.fx.GraphModule) -> int:
    """Replace every eligible decode SDPA in `gm` (module doc), in place; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        site = _decode_site(node)
        if site is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.slimfx.gqa_decode_attention.default, site)
        new.meta = dict(node.meta)
        repeated = (node.args[1:3] if len(node.args) >= 3 else []) or [node.kwargs.get("key"), node.kwargs.get("value")]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for chain in repeated:
            _erase_unused_chain(gm.graph, chain)
        count += 1
    if count:
        gm.recompile()
    return count


def _erase_unused_chain(graph: torch.fx.Graph, node) -> None:
    """Erase the repeat's reshape <- expand <- getitem (three nodes, never the cache itself,
    which may be an in-place update's result) where nothing else uses them. Not FX's dead
    code pass: it does not treat in-place methods such as index_copy_ as side effects."""
    for _ in range(3):
        if not isinstance(node, torch.fx.Node) or node.users:
            return
        parent = node.args[0]
        graph.erase_node(node)
        node = parent
