"""Model anatomy from the graph alone.

Given a dynamo FX graph of a decoder-only LM, find: the linears (with shapes), the
attention sites (SDPA calls, or matmul -> softmax -> matmul written by hand), each
site's q/k/v/o projections, rotary embedding, KV-cache inputs and update ops, the
residual stream and decoder blocks, the MLPs, the final norm and the LM head.

Nothing here looks at module class names: recognition is by dataflow. Parameter
paths (taken from the tensors themselves, see `record_parameter_paths`) label what
was found and are how plans and artifacts name a linear. Whatever cannot be recognised is listed in `Anatomy.unrecognised` rather
than guessed.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx
import torch.nn.functional as F

Node = torch.fx.Node

# ----------------------------------------------------------------------------- op classes


def _targets(*names: str) -> set:
    """Resolve 'torch.x', 'F.x', 'aten.x' spellings to the callables present in this torch."""
    found = set()
    for name in names:
        obj = {"torch": torch, "F": F, "nn": torch._C._nn, "operator": operator}
        root, _, rest = name.partition(".")
        cur = obj.get(root)
        for part in rest.split("."):
            cur = getattr(cur, part, None) if cur is not None else None
        if cur is not None:
            found.add(cur)
    return found


LINEAR = _targets("F.linear", "nn.linear")
SDPA = _targets("F.scaled_dot_product_attention", "nn.scaled_dot_product_attention")
MATMUL = _targets("torch.matmul", "operator.matmul", "torch.bmm")
SOFTMAX = _targets("F.softmax", "torch.softmax", "torch.nn.functional.softmax", "torch.special.softmax")
EMBEDDING = _targets("F.embedding", "torch.embedding")
ADD = _targets("operator.add", "torch.add", "operator.iadd")
MUL = _targets("operator.mul", "torch.mul")
CAT = _targets("torch.cat", "torch.concat", "torch.concatenate")
ACTIVATIONS = _targets("F.silu", "F.gelu", "F.relu", "torch.tanh", "F.tanh", "torch.sigmoid", "F.sigmoid")
ACTIVATION_METHODS = {"silu", "gelu", "relu", "tanh", "sigmoid"}

# Ops a value can flow through without becoming a different quantity: reshapes,
# layout changes, casts, head splitting/merging, dropout at eval.
_VIEW_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "to", "float", "half", "bfloat16",
    "type_as", "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "clone", "repeat_interleave",
    "view_as", "__getitem__", "chunk", "split", "unbind",
}
_VIEW_FUNCS = _targets(
    "torch.reshape", "torch.transpose", "torch.permute", "torch.flatten", "torch.unsqueeze", "torch.squeeze",
    "torch.repeat_interleave", "F.dropout", "torch.split", "torch.chunk", "torch.unbind", "operator.getitem",
    "torch.narrow", "torch.clone",
)
# Calls that write into their first argument (KV caches updated in place).
_MUTATING_METHODS = {"index_put_", "index_copy_", "copy_", "__setitem__", "scatter_", "narrow_copy"}
_MUTATING_FUNCS = _targets("operator.setitem", "torch.index_put", "torch.Tensor.index_put_", "torch.Tensor.copy_")


def is_call(node, funcs: set | None = None, methods: Iterable[str] = ()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function" and funcs and node.target in funcs:
        return True
    return node.op == "call_method" and node.target in set(methods)


def is_linear(node) -> bool:
    return is_call(node, LINEAR)


def is_sdpa(node) -> bool:
    return is_call(node, SDPA)


def is_softmax(node) -> bool:
    return is_call(node, SOFTMAX, ("softmax",))


def is_matmul(node) -> bool:
    return is_call(node, MATMUL, ("matmul", "bmm", "__matmul__"))


def is_view_like(node) -> bool:
    return is_call(node, _VIEW_FUNCS, _VIEW_METHODS)


def is_add(node) -> bool:
    return is_call(node, ADD, ("add", "__add__"))


def is_mutation(node) -> bool:
    return is_call(node, _MUTATING_FUNCS, _MUTATING_METHODS)


def is_activation(node) -> bool:
    return is_call(node, ACTIVATIONS, ACTIVATION_METHODS)


def meta(node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node) -> tuple | None:
    value = meta(node)
    if value is None:
        return None
    # Symbolic sizes stay symbolic: int() on a SymInt would specialise it (a guard
    # pinning one prompt length, so every new length recompiles).
    return tuple(s if isinstance(s, torch.SymInt) else int(s) for s in value.shape)


# ----------------------------------------------------------------------------- parameter names

PATH_META = "slimfx_param_path"
# Set by passes that remove decoder blocks (layer_skip): on each surviving attention
# node its block number in the unmodified model; on the GraphModule what was removed,
# {"blocks": [...], "mlps": [...] (blocks whose MLP went), "weights": [weight paths]}.
BLOCK_META = "slimfx_block"
REMOVED_META = "slimfx_removed"
# On get_attr nodes of tensors a pass bound (KV store, packed weights, codebooks): set by
# passes._graph.bind_tensor, read by codegen.store_inputs to lift them into graph inputs.
BOUND_META = "slimfx_bound"
# Attributes dynamo walks through on the way to a tensor: containers, not names.
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def record_parameter_paths(gm: torch.fx.GraphModule, example_inputs=None, model: torch.nn.Module | None = None) -> None:
    """Name every placeholder that holds a module's parameter or buffer, once, in
    `node.meta[PATH_META]` ('model.layers.0.self_attn.q_proj.weight').

    The name comes from the tensor itself: matched by identity against `model`'s
    named parameters and buffers when the model is known, else read from the source
    dynamo records for the placeholder (`L['args'][0]._modules['model']...`). Never
    from the placeholder's spelling, which changes between torch and transformers
    releases. Must run while dynamo still holds the graph (inside a backend): dynamo
    drops its per-placeholder records once the backend returns.
    """
    by_id = _named_tensors(model) if model is not None else {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(example_inputs) if example_inputs is not None else [None] * len(placeholders)
    for node, value in zip(placeholders, values):
        if PATH_META in node.meta:
            continue
        arg = node.meta.get("grapharg")
        if value is None and arg is not None:
            value = getattr(arg, "example", None)
        path = by_id.get(id(value)) if value is not None else None
        if path is None and arg is not None:
            path = _module_path(getattr(arg, "source", None))
        if path:
            node.meta[PATH_META] = path


def _named_tensors(model: torch.nn.Module) -> dict[int, str]:
    named = {}
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        named.setdefault(id(t), name)
    return named


def _module_path(source) -> str | None:
    """'a.b.0.weight' for a dynamo source reaching a tensor through nn.Modules, or None
    when the source is not an attribute chain from a module (a plain input)."""
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    chain.reverse()  # root first
    root = next((i for i, s in enumerate(chain) if "NNModule" in type(s).__name__), None)
    if root is None:
        return None
    parts = []
    for s in chain[root + 1:]:
        key = getattr(s, "member", getattr(s, "index", None))
        if key is None or key in _CONTAINERS:
            continue  # a wrapper that names nothing, or a container attribute
        if not isinstance(key, (str, int)):
            return None
        parts.append(str(key))
    return ".".join(parts) or None


def param_path(node: Node) -> str:
    """The module path of a parameter/buffer node ('model.layers.0.self_attn.q_proj.weight');
    a graph attribute's own name for get_attr; the node's name when nothing is known."""
    if node.op == "get_attr":
        return str(node.target)
    return node.meta.get(PATH_META) or node.name


def is_parameter_node(node) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and isinstance(meta(node), torch.nn.Parameter)


def weight_source(node: Node) -> Node | None:
    """The parameter/buffer node behind a weight operand (through casts and views)."""
    seen = 0
    while isinstance(node, Node) and seen < 8:
        if node.op in ("placeholder", "get_attr"):
            return node
        if is_view_like(node) and node.args:
            node = node.args[0]
            seen += 1
            continue
        return None
    return None


# ----------------------------------------------------------------------------- records


@dataclass
class LinearInfo:
    node: str
    weight: str  # parameter path
    in_features: int
    out_features: int
    bias: bool
    role: str = "unknown"  # q k v qkv o gate up gate_up down lm_head unknown
    block: int | None = None


@dataclass
class KVCacheInfo:
    """How a site's keys/values reach the attention.

    kind: "none" (no cache in this graph), "concat" (past tensors are graph inputs,
    new ones concatenated: HF DynamicCache), "inplace" (a buffer written in place and
    read whole: gpt-fast, HF StaticCache).
    """

    kind: str = "none"
    key_inputs: list[str] = field(default_factory=list)
    value_inputs: list[str] = field(default_factory=list)
    update_nodes: list[str] = field(default_factory=list)


@dataclass
class AttentionVariant:
    """What a site's attention computes besides softmax(q k^T * scale) v, as its graph shows it.

    causal: True where the graph applies causality (SDPA's is_causal, or a mask built from
    a query/key index comparison), False where a multi-token call applies none, None when
    unknown. window: a sliding window of that many positions (the mask keeps
    kv > q - window). softcap: scores become tanh(s / c) * c before the softmax (Gemma-2).
    qk_norm: a norm between the q/k projections and the attention (Qwen3, Gemma-3, OLMo-2).
    position: "rotary (<kind>)", "learned absolute" (a position embedding added to the
    token embedding) or "none". scale: the factor the scores get (hand-written attention).
    not_understood: what changes the attention that the anatomy cannot name (attention
    sinks, an additive score bias such as ALiBi, chunked masks, unknown ops on the scores)."""

    causal: bool | None = None
    window: int | None = None
    softcap: float | None = None
    qk_norm: str | None = None
    position: str = "none"
    scale: float | None = None
    not_understood: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = ["causal" if self.causal else "not causal" if self.causal is False else "causality unknown"]
        if self.window:
            parts.append(f"sliding window {self.window}")
        if self.softcap:
            parts.append(f"softcap {self.softcap:g}")
        if self.qk_norm:
            parts.append(f"q/k {self.qk_norm}")
        parts.append(f"position {self.position}")
        return ", ".join(parts + [f"NOT UNDERSTOOD: {u}" for u in self.not_understood])


@dataclass
class AttentionSite:
    index: int
    node: str  # the SDPA node, or the softmax node for hand-written attention
    kind: str  # "sdpa" | "matmul_softmax"
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    fused_qkv: bool = False
    n_q_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rotary: str | None = None  # "rotate_half" | "interleaved" | "complex" | None
    cache: KVCacheInfo = field(default_factory=KVCacheInfo)
    q_input: str | None = None  # node feeding the attention's query operand
    k_input: str | None = None
    v_input: str | None = None
    output: str | None = None  # node whose value is the attention output [B, H, S, D]
    variant: AttentionVariant = field(default_factory=AttentionVariant)


@dataclass
class MLPInfo:
    linears: dict[str, str]  # role -> linear node
    activation: str | None = None


@dataclass
class Block:
    index: int
    attention: int | None  # its attention site's index (AttentionSite.index)
    mlp: MLPInfo | None
    residual_adds: list[str] = field(default_factory=list)
    input_norm: str | None = None  # rms_norm | layer_norm | None


@dataclass
class Anatomy:
    linears: list[LinearInfo]
    attention_sites: list[AttentionSite]
    blocks: list[Block]
    embedding: str | None = None  # embedding weight path
    vocab_size: int | None = None
    hidden_size: int | None = None
    final_norm: str | None = None
    lm_head: LinearInfo | None = None
    tied_head: bool | None = None
    unrecognised: list[str] = field(default_factory=list)
    removed_blocks: list[int] = field(default_factory=list)  # blocks of the unmodified model a pass removed
    removed_mlps: list[int] = field(default_factory=list)  # blocks whose MLP a pass removed
    removed_weights: list[str] = field(default_factory=list)  # paths of the linears' weights a pass removed

    @property
    def model_blocks(self) -> int:
        """Blocks of the unmodified model: those present plus those a pass removed."""
        return len(self.blocks) + len(self.removed_blocks)

    def linear(self, node_name: str) -> LinearInfo | None:
        return next((l for l in self.linears if l.node == node_name), None)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token adds across all sites (at `dtype_bytes` per element)."""
        total = 0
        for s in self.attention_sites:
            if s.n_kv_heads and s.head_dim:
                total += 2 * s.n_kv_heads * s.head_dim * dtype_bytes
        return total

    def summary(self) -> str:
        sites = self.attention_sites
        heads = {(s.n_q_heads, s.n_kv_heads, s.head_dim) for s in sites}
        head_text = ", ".join(f"{q}q/{kv}kv x {d}" for q, kv, d in sorted(heads, key=str))
        head = "none"
        if self.lm_head:
            head = f"{self.lm_head.in_features}->{self.lm_head.out_features} ({'tied' if self.tied_head else 'untied'})"
        return (
            f"{len(self.blocks)} blocks, {len(sites)} attention sites ({head_text or '-'}), "
            f"{len(self.linears)} linears, LM head {head}"
        )

    def site_variant(self, site: AttentionSite) -> str:
        """The site's variant in words, with the bias terms its projections add."""
        biased = [role for role, node in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj), ("o", site.o_proj))
                  if node and self.linear(node) and self.linear(node).bias]
        if site.fused_qkv and biased[:1] == ["q"]:
            biased = ["qkv"] + biased[3:]
        return site.variant.describe() + (f", projection bias {'/'.join(biased)}" if biased else "")

    def variant_groups(self) -> list[tuple[str, str]]:
        """('sites 0,2,4', text) per distinct variant, in order of first site."""
        groups: dict[str, list[int]] = {}
        for s in self.attention_sites:
            groups.setdefault(self.site_variant(s), []).append(s.index)
        return [(f"site{'s' if len(ix) > 1 else ''} {fold_indices(ix)}", text) for text, ix in groups.items()]

    def table(self) -> str:
        """The anatomy as text tables (what `slimfx inspect` prints)."""
        from slimfx.compiler.tables import format_table

        lines = [
            f"vocab {self.vocab_size}  hidden {self.hidden_size}  blocks {len(self.blocks)}  "
            f"attention sites {len(self.attention_sites)}  final norm {self.final_norm or '?'}  "
            f"LM head {'tied to embedding' if self.tied_head else 'untied' if self.lm_head else 'not found'}",
            "",
        ]
        if self.removed_blocks or self.removed_mlps:
            lines[1:1] = [f"removed by a pass: blocks {self.removed_blocks or '-'}, MLPs of blocks {self.removed_mlps or '-'}"]
        rows = []
        for s in self.attention_sites:
            proj = "qkv fused" if s.fused_qkv else "q,k,v"
            rows.append([
                s.index, s.kind, s.n_q_heads, s.n_kv_heads, s.head_dim, s.rotary or "-", s.cache.kind,
                proj, _lin_label(self, s.q_proj), _lin_label(self, s.o_proj),
            ])
        lines.append(format_table(["site", "kind", "q heads", "kv heads", "head dim", "rotary", "kv cache", "proj", "q/qkv weight", "o weight"], rows))
        lines += ["", "attention variants (sites alike grouped):"] + [f"  {label}: {text}" for label, text in self.variant_groups()] + [""]
        rows = [[b.index, b.attention if b.attention is not None else "-", b.input_norm or "-",
                 ",".join(b.mlp.linears) if b.mlp else "-", (b.mlp.activation if b.mlp else None) or "-",
                 len(b.residual_adds)] for b in self.blocks]
        lines.append(format_table(["block", "attention", "norm", "mlp linears", "activation", "residual adds"], rows))
        lines.append("")
        rows = [[l.block if l.block is not None else "-", l.role, l.weight, l.in_features, l.out_features, "yes" if l.bias else "-"] for l in self.linears]
        lines.append(format_table(["block", "role", "weight", "in", "out", "bias"], rows))
        if self.unrecognised:
            lines += ["", "not recognised:"] + [f"  - {u}" for u in self.unrecognised]
        return "\n".join(lines)


def fold_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def _lin_label(anatomy: Anatomy, node: str | None) -> str:
    info = anatomy.linear(node) if node else None
    return info.weight if info else "-"


# ----------------------------------------------------------------------------- graph walks


def _trace_back(start: Node, stop, *, limit: int = 64, through_mutations: bool = True, barrier=None) -> list[Node]:
    """Nodes matching `stop` reached walking backwards from `start` through any op,
    not walking past a match nor past a `barrier` node. Placeholders written in place
    (KV buffers) are followed into the value written (the mutation's last tensor argument)."""
    found, seen = [], set()
    queue = deque([start])
    steps = 0
    while queue and steps < limit * 8:
        node = queue.popleft()
        steps += 1
        if node in seen:
            continue
        seen.add(node)
        if node is not start and stop(node):
            found.append(node)
            continue
        if barrier is not None and node is not start and barrier(node):
            continue
        preds = list(node.all_input_nodes)
        if through_mutations:  # a buffer written in place (a KV cache): follow what was written
            preds += [_written_value(m) for m in _mutations_of(node)]
        queue.extend(p for p in preds if isinstance(p, Node))
    return found


def _mutations_of(buffer: Node) -> list[Node]:
    return [u for u in buffer.users if is_mutation(u) and u.args and u.args[0] is buffer]


def _written_value(mutation: Node) -> Node | None:
    tensors = [a for a in mutation.args[1:] if isinstance(a, Node)]
    return tensors[-1] if tensors else None


def _path_nodes(src: Node, dst: Node, limit: int = 64) -> list[Node]:
    """Nodes on backward paths from dst to src (inclusive), bounded."""
    result, seen = [], set()
    queue = deque([dst])
    while queue and len(seen) < limit * 8:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        result.append(node)
        if node is src:
            continue
        queue.extend(node.all_input_nodes)
    return result


def _forward_through_views(node: Node, limit: int = 16) -> list[Node]:
    """Users of `node` reached through view-like ops (first non-view users)."""
    out, seen = [], set()
    queue = deque([node])
    while queue and len(seen) < limit * 4:
        cur = queue.popleft()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if is_view_like(user):
                queue.append(user)
            else:
                out.append(user)
    return out


def _back_through_views(node: Node) -> Node:
    while isinstance(node, Node) and is_view_like(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


# ----------------------------------------------------------------------------- analysis


class _Analyzer:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.unrecognised: list[str] = []
        self.linears: dict[Node, LinearInfo] = {}
        self.removed = gm.meta.get(REMOVED_META, {})

    # -- linears -------------------------------------------------------------
    def find_linears(self) -> None:
        for node in self.nodes:
            if not is_linear(node):
                continue
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            wshape = shape_of(weight)
            src = weight_source(weight) if isinstance(weight, Node) else None
            if wshape is None or len(wshape) != 2:
                self.unrecognised.append(f"linear {node.name}: weight shape unknown")
                continue
            self.linears[node] = LinearInfo(
                node=node.name,
                weight=param_path(src) if src is not None else weight.name,
                in_features=int(wshape[1]),
                out_features=int(wshape[0]),
                bias=isinstance(bias, Node),
            )

    def linear_producers(self, node: Node) -> list[Node]:
        return _trace_back(node, lambda n: n in self.linears)

    # -- attention -----------------------------------------------------------
    def find_attention(self) -> list[AttentionSite]:
        sites = []
        for node in self.nodes:
            if is_sdpa(node):
                q, k, v = (list(node.args) + [node.kwargs.get(n) for n in ("query", "key", "value")])[:3]
                sites.append(self._site(node, "sdpa", q, k, v, node))
            elif is_softmax(node):
                site = self._handwritten_site(node)
                if site is not None:
                    sites.append(site)
        # A pass that removed blocks labels each surviving attention node with its block
        # number in the unmodified model (BLOCK_META): sites and blocks keep that number,
        # so KV-store sites, per-layer overrides and plans still mean the same layer.
        by_name = {n.name: n for n in self.nodes}
        for i, s in enumerate(sites):
            s.index = by_name[s.node].meta.get(BLOCK_META, i)
        learned = self._learned_positions()
        for s in sites:
            s.variant.position = (f"rotary ({s.rotary})" if s.rotary else "learned absolute" if learned
                                  else "none" if s.q_proj else "unknown (no q projection found)")
            for what in s.variant.not_understood:
                self.unrecognised.append(f"attention {s.node}: {what}")
        return sites

    def _handwritten_site(self, softmax: Node) -> AttentionSite | None:
        scores = _trace_back(softmax, is_matmul, limit=8)
        outs = [u for u in _forward_through_views(softmax) if is_matmul(u) and self._reaches(softmax, u.args[0])]
        if len(scores) != 1 or len(outs) != 1:
            return None  # a softmax that is not attention (e.g. a router or a sampler)
        qk, pv = scores[0], outs[0]
        q, k_t, v = qk.args[0], qk.args[1], pv.args[1]
        site = self._site(softmax, "matmul_softmax", q, k_t, v, pv)
        self._score_path(site.variant, qk, softmax, pv)
        return site

    def _reaches(self, src: Node, dst) -> bool:
        return isinstance(dst, Node) and src in _path_nodes(src, dst, limit=8)

    def _site(self, node, kind, q, k, v, output) -> AttentionSite:
        site = AttentionSite(index=-1, node=node.name, kind=kind, output=output.name)
        site.q_input, site.k_input, site.v_input = (getattr(x, "name", None) for x in (q, k, v))
        qp, kp, vp = (self._single_producer(site, role, x) for role, x in (("q", q), ("k", k), ("v", v)))
        site.q_proj, site.k_proj, site.v_proj = (p.name if p is not None else None for p in (qp, kp, vp))
        site.fused_qkv = qp is not None and qp is kp is vp
        self._heads(site, q, k, qp, kp)
        site.rotary = self._rotary(qp, q) if qp is not None else None
        site.variant.qk_norm = _qk_norm(qp, q, kp, k)
        if kind == "sdpa":
            self._sdpa_mask(site.variant, node, q)
        site.cache = self._cache(k, v, kp, vp)
        o = self._o_proj(output)
        site.o_proj = o.name if o is not None else None
        if o is None:
            self.unrecognised.append(f"attention {node.name}: no output projection found")
        return site

    def _sdpa_mask(self, variant: AttentionVariant, node: Node, q) -> None:
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        is_causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        if is_causal is True:
            variant.causal = True
        elif isinstance(mask, Node) and _is_mask_term(mask):
            _mask_facts(variant, mask)
        elif isinstance(mask, Node):
            variant.not_understood.append(f"an SDPA mask {mask.name} that is not only a mask (ALiBi or a learned position bias?)")
        else:  # no mask: one query has nothing later to hide from; several see each other
            qshape = shape_of(q) if isinstance(q, Node) else None
            tokens = qshape[2] if qshape and isinstance(qshape[2], int) else None
            variant.causal = None if tokens is None else tokens == 1

    def _score_path(self, variant: AttentionVariant, qk: Node, softmax: Node, pv: Node) -> None:
        """Read what hand-written attention does to q k^T before the softmax: a scale,
        logit softcapping (x / c -> tanh -> * c), an additive mask; anything else is named."""
        variant.scale, cur = 1.0, qk
        while cur is not softmax:
            users = list(cur.users)
            if len(users) != 1:
                variant.not_understood.append(f"the scores {cur.name} are used {len(users)} times before the softmax")
                return
            nxt = users[0]
            const = _constant_operand(nxt, cur)
            cap = _softcap_from(nxt, cur)
            if nxt is softmax or is_view_like(nxt):
                pass
            elif cap is not None:
                variant.softcap, nxt = cap, next(iter(next(iter(nxt.users)).users))
            elif const is not None and is_call(nxt, MUL, ("mul", "__mul__")):
                variant.scale *= const
            elif const is not None and is_call(nxt, _DIV, ("div", "__truediv__")):
                variant.scale /= const
            elif is_add(nxt) and len(nxt.all_input_nodes) == 2:
                term = next(n for n in nxt.all_input_nodes if n is not cur)
                if _is_mask_term(term):
                    _mask_facts(variant, term)
                else:
                    variant.not_understood.append(f"an additive score term {term.name} that is not a mask (ALiBi or a learned position bias?)")
            elif is_call(nxt, CAT, ("cat",)):
                variant.not_understood.append(f"the scores are joined with other logits at {nxt.name} before the softmax (attention sinks?)")
                return
            else:
                what = nxt.target if nxt.op == "call_method" else getattr(nxt.target, "__name__", nxt.target)
                variant.not_understood.append(f"the scores pass through {what} ({nxt.name}) before the softmax")
                return
            cur = nxt
        if variant.causal is None and not variant.not_understood:
            variant.causal = False

    def _learned_positions(self) -> bool:
        """A second embedding table in the graph: learned absolute positions (GPT-2, OPT)."""
        return sum(1 for n in self.nodes if is_call(n, EMBEDDING)) > 1

    def _single_producer(self, site, role: str, x) -> Node | None:
        if not isinstance(x, Node):
            self.unrecognised.append(f"attention {site.node}: {role} operand is not a graph value")
            return None
        found = self.linear_producers(x)
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} candidate"
            self.unrecognised.append(f"attention {site.node}: {what} {role} projection")
            return None
        return found[0]

    def _heads(self, site: AttentionSite, q, k, qp, kp) -> None:
        qshape = shape_of(q)
        if qshape is None or len(qshape) != 4:
            self.unrecognised.append(f"attention {site.node}: query shape unknown")
            return
        site.n_q_heads, site.head_dim = int(qshape[1]), int(qshape[3])
        if kp is None:
            site.n_kv_heads = _heads_behind(k, site.head_dim, qshape[2])
            return
        k_out = self.linears[kp].out_features
        if site.fused_qkv:
            k_out = (k_out - site.n_q_heads * site.head_dim) // 2
        if k_out % site.head_dim:
            self.unrecognised.append(f"attention {site.node}: k projection width {k_out} not a multiple of head_dim")
            return
        site.n_kv_heads = k_out // site.head_dim

    def _rotary(self, proj: Node, q: Node) -> str | None:
        on_path = _path_nodes(proj, q, limit=32)
        names = {str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)) for n in on_path}
        if "view_as_complex" in names:
            return "complex"
        if "neg" in names and any(is_call(n, CAT) for n in on_path):
            return "rotate_half"
        if "stack" in names and ("sub" in names or "mul" in names):
            return "interleaved"
        return None

    def _cache(self, k, v, kp, vp) -> KVCacheInfo:
        info = KVCacheInfo()
        for operand, out in ((k, info.key_inputs), (v, info.value_inputs)):
            if not isinstance(operand, Node):
                continue
            stores = _trace_back(operand, _is_kv_buffer, limit=16, through_mutations=False, barrier=lambda n: n in self.linears)
            for buf in stores:
                out.append(param_path(buf))
                muts = _mutations_of(buf)
                if muts:
                    info.kind = "inplace"
                    info.update_nodes += [m.name for m in muts]
                else:
                    info.kind = "concat"
                    info.update_nodes += [c.name for c in _forward_cats(buf)]
            if not stores:
                src = _back_through_views(operand)
                if is_call(src, CAT) and (kp is not None or vp is not None) and _cat_with_empty(src):
                    info.kind = "concat"  # first step of a dynamic cache: cat(empty, new)
                    info.update_nodes.append(src.name)
        return info

    def _o_proj(self, output: Node) -> Node | None:
        users = _forward_through_views(output)
        linears = [u for u in users if u in self.linears]
        return linears[0] if len(linears) == 1 else None

    # -- residual stream, blocks, MLPs, head ---------------------------------
    def find_structure(self, sites: list[AttentionSite]) -> tuple[list[Block], dict]:
        by_name = {n.name: n for n in self.nodes}
        extra: dict = {}
        emb = next((n for n in self.nodes if is_call(n, EMBEDDING)), None)
        if emb is not None:
            w = emb.args[1] if len(emb.args) > 1 else None
            wshape = shape_of(w)
            extra["embedding_node"] = w
            if wshape:
                extra["vocab_size"], extra["hidden_size"] = int(wshape[0]), int(wshape[1])
            extra["embedding"] = param_path(weight_source(w)) if isinstance(w, Node) and weight_source(w) is not None else None
        else:
            self.unrecognised.append("no token embedding in the graph (inputs_embeds given?)")

        blocks = []
        for i, site in enumerate(sites):
            o = by_name.get(site.o_proj) if site.o_proj else None
            attn_add = self._residual_add(o) if o is not None else None
            next_start = self._block_start(sites[i + 1]) if i + 1 < len(sites) else None
            mlp, mlp_add = self._mlp(attn_add, next_start) if attn_add is not None else (None, None)
            adds = [n.name for n in (attn_add, mlp_add) if n is not None]
            if attn_add is None:
                self.unrecognised.append(f"block {site.index}: no residual add after the attention output projection")
            elif mlp is None and site.index not in self.removed.get("mlps", ()):
                self.unrecognised.append(f"block {site.index}: no MLP found between this attention and the next")
            blocks.append(Block(site.index, site.index, mlp, adds, self._norm_kind(by_name.get(site.q_proj))))
            self._label_attention(site, site.index)
            extra.setdefault("last_add", None)
            extra["last_add"] = mlp_add or attn_add or extra["last_add"]
        return blocks, extra

    def _residual_add(self, linear: Node) -> Node | None:
        adds = [u for u in _forward_through_views(linear) if is_add(u)]
        return adds[0] if len(adds) == 1 else None

    def _block_start(self, site: AttentionSite) -> int:
        by_name = {n.name: n for n in self.nodes}
        projs = [by_name[p] for p in (site.q_proj, site.k_proj, site.v_proj) if p]
        return min((self.order[p] for p in projs), default=self.order[by_name[site.node]])

    def _mlp(self, attn_add: Node, next_start: int | None) -> tuple[MLPInfo | None, Node | None]:
        start = self.order[attn_add]
        end = next_start if next_start is not None else len(self.nodes)
        linears = [n for n in self.linears if start < self.order[n] < end]
        if next_start is None:
            linears = [n for n in linears if self._is_mlp_linear(n, attn_add)]
        if not linears:
            return None, None
        down = linears[-1]
        mlp_add = self._residual_add(down)
        roles: dict[str, str] = {}
        ups = linears[:-1]
        activation = None
        act = next((n for n in self.nodes if start < self.order[n] < self.order[down] and is_activation(n)), None)
        if act is not None:
            activation = act.target if act.op == "call_method" else act.target.__name__
        if len(ups) == 1:
            roles["gate_up" if self._gated(ups[0], down) else "up"] = ups[0].name
        elif len(ups) == 2:
            gate = next((u for u in ups if act is not None and act in _forward_through_views(u)), None)
            if gate is None:
                self.unrecognised.append(f"MLP before {down.name}: two input projections but no activation on either")
                roles.update({"in_0": ups[0].name, "in_1": ups[1].name})
            else:
                roles["gate"] = gate.name
                roles["up"] = next(u for u in ups if u is not gate).name
        elif ups:
            self.unrecognised.append(f"MLP before {down.name}: {len(ups)} input projections")
        roles["down"] = down.name
        for role, name in roles.items():
            self.linears[next(n for n in self.linears if n.name == name)].role = role
        return MLPInfo(roles, activation), mlp_add

    def _gated(self, up: Node, down: Node) -> bool:
        """One projection split in two halves multiplied together (Phi-3 gate_up)."""
        on_path = _path_nodes(up, down.args[0], limit=16)
        return any(is_call(n, MUL, ("mul", "__mul__")) and all(up in _path_nodes(up, a, 16) for a in n.all_input_nodes) for n in on_path if len(n.all_input_nodes) == 2)

    def _is_mlp_linear(self, lin: Node, attn_add: Node) -> bool:
        return self.linears[lin].out_features != self._vocab_guess()

    def _vocab_guess(self) -> int | None:
        emb = next((n for n in self.nodes if is_call(n, EMBEDDING)), None)
        shape = shape_of(emb.args[1]) if emb is not None else None
        return int(shape[0]) if shape else None

    def _norm_kind(self, proj: Node | None) -> str | None:
        if proj is None or not proj.args or not isinstance(proj.args[0], Node):
            return None
        # The norm sits between the residual stream (an add, or the embedding for
        # the first block) and the projection's input.
        stream = _trace_back(proj.args[0], lambda n: is_add(n) or is_call(n, EMBEDDING), limit=12)
        if not stream:
            return None
        return _classify_norm(_path_nodes(stream[0], proj.args[0], limit=16))

    def _label_attention(self, site: AttentionSite, block: int) -> None:
        by_name = {n.name: n for n in self.linears}
        for role, name in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj), ("o", site.o_proj)):
            if name in by_name:
                info = self.linears[by_name[name]]
                info.role = "qkv" if site.fused_qkv and role != "o" else role
                info.block = block

    def find_head(self, extra: dict) -> tuple[LinearInfo | None, bool | None, str | None]:
        vocab = extra.get("vocab_size")
        cands = [n for n, info in self.linears.items() if info.role == "unknown" and (vocab is None or info.out_features == vocab)]
        if not cands:
            self.unrecognised.append("no LM head (no linear to vocab size after the last block)")
            return None, None, None
        head = cands[-1]
        info = self.linears[head]
        info.role = "lm_head"
        emb_w = extra.get("embedding_node")
        head_w = head.args[1]
        tied = None
        if emb_w is not None:
            a, b = weight_source(emb_w), weight_source(head_w)
            tied = a is not None and (a is b or _same_storage(a, b))
        last = extra.get("last_add")
        norm = None
        if last is not None and isinstance(head.args[0], Node):
            norm = _classify_norm(_path_nodes(last, head.args[0], limit=24))
        return info, tied, norm

    def assign_blocks(self, blocks: list[Block]) -> None:
        for b in blocks:
            if b.mlp:
                for name in b.mlp.linears.values():
                    for n, info in self.linears.items():
                        if n.name == name:
                            info.block = b.index


_DIV = _targets("operator.truediv", "torch.div", "torch.true_divide")
_COMPARE = _targets("operator.gt", "operator.ge", "operator.lt", "operator.le", "torch.gt", "torch.ge", "torch.lt", "torch.le")
_COMPARE_METHODS = ("gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__")
_SUB = _targets("operator.sub", "torch.sub")
_FLOORDIV = _targets("operator.floordiv", "torch.floor_divide")
_FULL = _targets("torch.full", "torch.ones", "torch.tensor", "torch.scalar_tensor")


def _constant_operand(node: Node, other: Node) -> float | None:
    """The number `node` combines `other` with (x * c, x / c), or None."""
    if len(node.args) != 2 or node.args[0] is not other or not isinstance(node.args[1], (int, float)):
        return None
    return float(node.args[1])


def _softcap_from(div: Node, scores: Node) -> float | None:
    """c when `div` starts tanh(scores / c) * c, else None."""
    cap = _constant_operand(div, scores)
    if cap is None or not is_call(div, _DIV, ("div", "__truediv__")) or len(div.users) != 1:
        return None
    tanh = next(iter(div.users))
    if not is_call(tanh, _targets("torch.tanh", "F.tanh"), ("tanh",)) or len(tanh.users) != 1:
        return None
    mul = next(iter(tanh.users))
    return cap if is_call(mul, MUL, ("mul", "__mul__")) and _constant_operand(mul, tanh) == cap else None


def _is_constant(x) -> bool:
    """A number, or a tensor made of one (torch.zeros(()), torch.full((), c)) in the graph."""
    if isinstance(x, (int, float)):
        return True
    value = meta(x) if isinstance(x, Node) else None
    return value is not None and value.numel() == 1 and is_call(_back_through_views(x), _FACTORIES | _FULL, ("new_zeros", "new_full"))


def _is_mask_term(term: Node) -> bool:
    """A boolean mask, or an additive term that only masks: constants picked by a boolean
    (torch.where(m, 0, -inf)), or such a term / a constant with masked_fill. A term that
    carries values of its own (ALiBi's slopes x distance) is not a mask."""
    src = _back_through_views(term)
    value = meta(src)
    if value is not None and value.dtype == torch.bool:
        return True
    if is_call(src, _targets("torch.where")) and len(src.args) == 3:
        return _is_constant(src.args[1]) and _is_constant(src.args[2])
    if is_call(src, _targets("torch.masked_fill"), ("masked_fill",)) and src.args:
        base = src.args[0]
        return _is_constant(base) or (isinstance(base, Node) and _is_mask_term(base))
    return False


def _mask_facts(variant: AttentionVariant, mask: Node, limit: int = 256) -> None:
    """Causality and a sliding window read from how a mask is built: an index comparison
    kv <= q (causal), kv > q - W (a window of W), (kv - pad) // C == (q - pad) // C
    (chunked attention, which the anatomy names as not understood). A mask read from a
    buffer or an input (gpt-fast's causal table) leaves causality unknown."""
    seen, queue = set(), deque([mask])
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if node.op in ("placeholder", "get_attr"):
            continue
        if is_call(node, _COMPARE, _COMPARE_METHODS) and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args):
            window = next((a for a in node.args if is_call(a, _SUB) and isinstance(a.args[1], int)), None)
            if window is None:
                variant.causal = True
            else:
                name = node.target if node.op == "call_method" else node.target.__name__
                variant.window = int(window.args[1]) + (1 if name.strip("_") == "ge" else 0)
        if is_call(node, _FLOORDIV, ("__floordiv__", "floor_divide")):
            variant.not_understood.append(f"a chunked attention mask ({node.name}: positions // chunk compared)")
            return
        queue.extend(node.all_input_nodes)


def _heads_behind(k, head_dim: int, tokens) -> int | None:
    """The fewest heads a [B, H, tokens, head_dim] tensor has on the key's way to the
    attention through views (before a GQA repeat): the kv heads where no projection tells
    them (GPT-2's Conv1D, matmul projections). A [B, tokens, H, head_dim] view before the
    head transpose only counts where it reads the same either way (H == tokens)."""
    heads = []
    while isinstance(k, Node):
        shape = shape_of(k)
        if shape is not None and len(shape) == 4 and shape[3] == head_dim and shape[2] == tokens and isinstance(shape[1], int):
            heads.append(shape[1])
        if not (is_view_like(k) and k.args and isinstance(k.args[0], Node)):
            break
        k = k.args[0]
    return min(heads) if heads else None


def _between(src: Node, dst: Node, limit: int = 64) -> list[Node]:
    """Nodes on a path from src to dst: descendants of src (no later than dst) that reach dst."""
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    down, queue = {src}, deque([src])
    while queue and len(down) < limit * 4:
        for user in queue.popleft().users:
            if user not in down and order[user] <= order[dst]:
                down.add(user)
                queue.append(user)
    up, queue = set(), deque([dst])
    while queue:
        node = queue.popleft()
        if node in up or node not in down:
            continue
        up.add(node)
        queue.extend(node.all_input_nodes)
    return [n for n in src.graph.nodes if n in up]


def _qk_norm(qp, q, kp, k) -> str | None:
    """A norm on both q and k between their projections and the attention."""
    if not all(isinstance(n, Node) for n in (qp, q, kp, k)):
        return None
    q_norm, k_norm = _classify_norm(_between(qp, q)), _classify_norm(_between(kp, k))
    return q_norm if q_norm and q_norm == k_norm else None


_FACTORIES = _targets("torch.zeros", "torch.empty", "torch.full", "torch.zeros_like", "torch.empty_like")


def _is_kv_buffer(node: Node) -> bool:
    """A 4-D tensor that enters the graph as an input/buffer, or is allocated in it
    (HF's StaticCache allocates lazily inside the first compiled call)."""
    shape = shape_of(node)
    if shape is None or len(shape) != 4:
        return False
    if node.op in ("placeholder", "get_attr"):
        return not is_parameter_node(node)
    return is_call(node, _FACTORIES, ("new_zeros", "new_empty"))


def _forward_cats(buf: Node) -> list[Node]:
    return [u for u in _forward_through_views(buf) if is_call(u, CAT)]


def _cat_with_empty(cat: Node) -> bool:
    """A cat along the sequence axis (-2 of [B, H, T, D]) with an empty part: a dynamic
    cache's first step. (Along the last axis it is a rotary split with nothing passed
    through, as Phi-3 builds its keys with partial_rotary_factor 1.0.)"""
    parts = cat.args[0] if cat.args else []
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    shape = shape_of(cat)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 2:
        return False
    for p in parts if isinstance(parts, (list, tuple)) else []:
        shape = shape_of(p)
        if shape is not None and 0 in shape:
            return True
    return False


def _same_storage(a: Node, b: Node) -> bool:
    ta, tb = meta(a), meta(b)
    if ta is None or tb is None:
        return False
    try:
        return ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and ta.shape == tb.shape
    except Exception:  # fake tensors without storage
        return False


def _classify_norm(nodes: list[Node]) -> str | None:
    names = {str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)) for n in nodes}
    if "layer_norm" in names:
        return "layer_norm"
    if "rms_norm" in names or ("rsqrt" in names and "mean" in names):
        return "rms_norm"
    return None


def analyze(gm: torch.fx.GraphModule) -> Anatomy:
    """The anatomy of a dynamo-captured decoder LM graph (see module docstring)."""
    record_parameter_paths(gm)
    a = _Analyzer(gm)
    a.find_linears()
    sites = a.find_attention()
    blocks, extra = a.find_structure(sites) if sites else ([], {})
    if not sites:
        a.unrecognised.append("no attention sites (no SDPA and no matmul-softmax-matmul)")
        emb = next((n for n in a.nodes if is_call(n, EMBEDDING)), None)
        if emb is not None and shape_of(emb.args[1]):
            extra["vocab_size"], extra["hidden_size"] = shape_of(emb.args[1])
            extra["embedding_node"] = emb.args[1]
    a.assign_blocks(blocks)
    head, tied, norm = a.find_head(extra) if (sites or extra) else (None, None, None)
    for n, info in a.linears.items():
        if info.role == "unknown":
            a.unrecognised.append(f"linear {info.weight} ({info.in_features}->{info.out_features}): role unknown")
    return Anatomy(
        linears=list(a.linears.values()),
        attention_sites=sites,
        blocks=blocks,
        embedding=extra.get("embedding"),
        vocab_size=extra.get("vocab_size"),
        hidden_size=extra.get("hidden_size"),
        final_norm=norm,
        lm_head=head,
        tied_head=tied,
        unrecognised=a.unrecognised,
        removed_blocks=sorted(a.removed.get("blocks", ())),
        removed_mlps=sorted(a.removed.get("mlps", ())),
        removed_weights=sorted(a.removed.get("weights", ())),
    )


def capture_graph(model: torch.nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """Run `model(*args, **kwargs)` once under dynamo and return the (single) captured graph.

    Raises RuntimeError when dynamo splits the forward into several graphs.
    """
    graphs = []

    def grab(gm, example_inputs, **_):
        record_parameter_paths(gm, example_inputs, model if isinstance(model, torch.nn.Module) else None)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise RuntimeError(f"dynamo captured {len(graphs)} graphs (graph breaks); anatomy needs one whole-model graph")
    return graphs[0]
