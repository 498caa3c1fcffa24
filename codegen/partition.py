"""Partition an ATen graph into fusion groups (networkx).

    partition(aten_gm) -> Partition(steps=[FusionGroup | fx.Node, ...] in execution order)

A fusion group is a connected set of fusable nodes with one iteration domain:

- "pointwise": every member has the same shape S; one flat index over S.
- "row": a domain rows x N, with any number of reductions over the last dim
  (sum/mean/amax/amin); members are either full (rows + [N]) or reduced
  (rows + [1] or rows). RMSNorm and softmax each become one row group.

Rules that keep the result correct:
- Groups are merged along data edges only, and a merge is refused when the
  contracted graph would get a cycle (a path leaving one group and re-entering the
  other), so a topological order of groups always exists.
- A mutating node (cache write, in-place op) is a barrier: it is ordered after every
  node before it and before every node after it, and no group spans it. So a read
  never moves across a write.
Nodes that are not fusable (matmul, SDPA, views, custom ops, unknown ops) are
singleton steps run as ATen calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from slimfx.codegen.ops import POINTWISE, REDUCTIONS, TRITON_DTYPE, Unsupported, _pow_scalar, aten, is_mutating, prims

ShapeKey = tuple  # tuple of str(size): symbolic sizes compare by expression, no guards


@dataclass
class FusionGroup:
    """Nodes fused into one kernel. `shape` is S (pointwise) or rows + (N,) (row)."""

    gid: int
    kind: str  # "pointwise" | "row"
    nodes: list = field(default_factory=list)  # fx.Node, topological order
    shape: tuple = ()  # sizes (int or SymInt) of the domain
    inputs: list = field(default_factory=list)  # external fx.Nodes read (tensors)
    outputs: list = field(default_factory=list)  # members read outside the group

    @property
    def name(self) -> str:
        ops = [n.target.__name__.split(".")[0] for n in self.nodes if hasattr(n.target, "__name__")]
        tag = "_".join(dict.fromkeys(o for o in ops if o not in ("mul", "add", "clone")))[:40] or "pw"
        return f"{self.kind}_{self.gid}_{tag}"

    def describe(self) -> str:
        ops = ", ".join(str(n.target).replace("aten.", "") for n in self.nodes)
        return f"{self.name}: {self.kind} over {tuple(str(s) for s in self.shape)}; {len(self.inputs)} in, {len(self.outputs)} out; [{ops}]"


@dataclass
class Partition:
    steps: list  # FusionGroup or fx.Node (run as an ATen call), in execution order
    groups: list

    def summary(self) -> str:
        fused = sum(len(g.nodes) for g in self.groups)
        lines = [f"{len(self.groups)} fusion groups covering {fused} nodes; {len(self.steps) - len(self.groups)} other steps"]
        lines += ["  " + g.describe() for g in self.groups]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- classification


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None


def _key(shape) -> ShapeKey:
    return tuple(str(s) for s in shape)


def _tensor_args(node: torch.fx.Node) -> list:
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


_ALLOWED_KWARGS = {
    aten.add.Tensor: {"alpha"},
    aten.sub.Tensor: {"alpha"},
    aten._to_copy.default: {"dtype"},
    aten.clone.default: {"memory_format"},
}


def _operands_ok(node: torch.fx.Node, out: torch.Tensor) -> bool:
    for arg in node.args:
        if isinstance(arg, torch.fx.Node):
            val = _val(arg)
            if not isinstance(val, torch.Tensor) or val.device != out.device or val.dtype not in TRITON_DTYPE:
                return False
        elif isinstance(arg, (list, tuple, dict)):
            return False
    return True


def is_pointwise(node: torch.fx.Node) -> bool:
    out = _val(node)
    if node.op != "call_function" or node.target not in POINTWISE or not isinstance(out, torch.Tensor):
        return False
    if out.dtype not in TRITON_DTYPE:
        return False
    numel = out.numel()
    if isinstance(numel, int) and numel == 0:
        return False
    if set(node.kwargs) - _ALLOWED_KWARGS.get(node.target, set()):
        return False
    if node.target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        return False
    if node.target is aten.pow.Tensor_Scalar:
        try:
            _pow_scalar(out.dtype, "x", node.args[1])
        except Unsupported:
            return False
    if node.target is prims.convert_element_type.default and len(node.args) != 2:
        return False
    if not _tensor_args(node) or not _operands_ok(node, out):
        return False
    return True


def reduction_dims_ok(node: torch.fx.Node) -> bool:
    """A supported reduction over exactly the last dim of a floating input."""
    if node.op != "call_function" or node.target not in REDUCTIONS:
        return False
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.ndim < 1:
        return False
    if not src.dtype.is_floating_point or src.dtype not in TRITON_DTYPE or out.dtype not in TRITON_DTYPE:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or len(dims) != 1 or dims[0] not in (-1, src.ndim - 1):
        return False
    if set(node.kwargs) - {"dtype", "keepdim", "dim"}:
        return False
    n = src.shape[-1]
    return not (isinstance(n, int) and n <= 1)


def _row_domain(node: torch.fx.Node):
    src = _val(node.args[0])
    return _key(src.shape[:-1]), str(src.shape[-1]), tuple(src.shape)


def _fits_row(shape_key: ShapeKey, rows: ShapeKey, n: str) -> bool:
    return shape_key in (rows + (n,), rows + ("1",), rows)


# ----------------------------------------------------------------------------- the partitioner


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule):
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.epoch = self._epochs()
        data = self._data_graph()
        # Contracted as groups merge (vertex = group id). Plain dicts of sets: the cycle
        # check walks them hundreds of times per model.
        self.succ = {v: set(data.successors(v)) for v in data.nodes}
        self.pred = {v: set(data.predecessors(v)) for v in data.nodes}
        self.group_of: dict = {}
        self.domain: dict = {}  # gid -> ("pointwise", S) | ("row", rows, N, sizes)
        self.members: dict = {}

    def _epochs(self) -> dict:
        epoch, out = 0, {}
        for n in self.nodes:
            if n.op == "call_function" and is_mutating(n):
                epoch += 1
                out[n] = epoch
                epoch += 1
            else:
                out[n] = epoch
        return out

    def _data_graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(range(len(self.nodes)))
        for n in self.nodes:
            for user in n.users:
                g.add_edge(self.index[n], self.index[user])
        # Order edges around each mutating node (see the module docstring).
        barriers = [i for i, n in enumerate(self.nodes) if n.op == "call_function" and is_mutating(n)]
        for b_prev, b in zip([None] + barriers, barriers + [None]):
            lo = 0 if b_prev is None else b_prev + 1
            hi = len(self.nodes) if b is None else b
            for i in range(lo, hi):
                if b_prev is not None:
                    g.add_edge(b_prev, i)
                if b is not None:
                    g.add_edge(i, b)
        g.add_edges_from(zip(barriers, barriers[1:]))
        return g

    def seed(self):
        for n in self.nodes:
            i = self.index[n]
            self.group_of[n] = i
            self.members[i] = [n]
            if is_pointwise(n):
                self.domain[i] = ("pointwise", _key(_val(n).shape), tuple(_val(n).shape))
            elif reduction_dims_ok(n):
                rows, size_n, sizes = _row_domain(n)
                self.domain[i] = ("row", rows, size_n, sizes)

    def _merged_domain(self, a: int, b: int):
        da, db = self.domain.get(a), self.domain.get(b)
        if da is None or db is None:
            return None
        if da[0] == "pointwise" and db[0] == "pointwise":
            return da if da[1] == db[1] else None
        if da[0] == "row" and db[0] == "row":
            return da if da[1:3] == db[1:3] else None
        row, pw_gid = (da, b) if da[0] == "row" else (db, a)
        rows, size_n = row[1], row[2]
        if all(_fits_row(_key(_val(m).shape), rows, size_n) for m in self.members[pw_gid]):
            return row
        return None

    def _creates_cycle(self, a: int, b: int) -> bool:
        """True if a path a -> ... -> b (or b -> a) exists other than a direct edge."""
        for src, dst in ((a, b), (b, a)):
            stack = [s for s in self.succ[src] if s != dst]
            seen = set(stack)
            while stack:
                v = stack.pop()
                if v == dst:
                    return True
                for w in self.succ[v]:
                    if w not in seen:
                        seen.add(w)
                        stack.append(w)
        return False

    def _contract(self, a: int, b: int) -> None:
        """Merge vertex b into a."""
        for p in self.pred.pop(b):
            self.succ[p].discard(b)
            if p != a:
                self.succ[p].add(a)
                self.pred[a].add(p)
        for s in self.succ.pop(b):
            self.pred[s].discard(b)
            if s != a:
                self.pred[s].add(a)
                self.succ[a].add(s)
        self.succ[a].discard(a)
        self.pred[a].discard(a)

    def contracted_graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.succ)
        g.add_edges_from((u, v) for u, vs in self.succ.items() for v in vs)
        return g

    def try_merge(self, u: torch.fx.Node, v: torch.fx.Node) -> None:
        a, b = self.group_of[u], self.group_of[v]
        if a == b or self.epoch[u] != self.epoch[v]:
            return
        domain = self._merged_domain(a, b)
        if domain is None or self._creates_cycle(a, b):
            return
        self._contract(a, b)
        for m in self.members[b]:
            self.group_of[m] = a
        self.members[a].extend(self.members.pop(b))
        self.domain[a] = domain
        self.domain.pop(b, None)

    def run(self) -> None:
        self.seed()
        for v in self.nodes:
            if v.op != "call_function" or self.group_of[v] not in self.domain:
                continue
            for u in _tensor_args(v):
                if self.group_of.get(u) in self.domain:
                    self.try_merge(u, v)


def _group_io(members: list, member_set: set) -> tuple[list, list]:
    inputs: list = []
    for m in members:
        for arg in _tensor_args(m):
            if arg not in member_set and arg not in inputs:
                inputs.append(arg)
    outputs = [m for m in members if any(user not in member_set for user in m.users)]
    return inputs, outputs


def partition(gm: torch.fx.GraphModule) -> Partition:
    """Fusion groups of `gm` (an ATen graph from lower_to_aten) and the order to run them."""
    b = _Builder(gm)
    b.run()
    order = nx.lexicographical_topological_sort(b.contracted_graph(), key=lambda gid: gid)
    steps, groups = [], []
    for gid in order:
        members = sorted(b.members[gid], key=b.index.__getitem__)
        domain = b.domain.get(gid)
        # A lone node is not worth a kernel unless it is a reduction (or a cast chain head).
        if domain is None or (len(members) == 1 and domain[0] == "pointwise" and members[0].target is aten.clone.default):
            steps.extend(members)
            continue
        member_set = set(members)
        inputs, outputs = _group_io(members, member_set)
        if not outputs:  # nothing reads it
            continue
        kind = domain[0]
        shape = domain[2] if kind == "pointwise" else domain[3]
        group = FusionGroup(gid=len(groups), kind=kind, nodes=members, shape=shape, inputs=inputs, outputs=outputs)
        groups.append(group)
        steps.append(group)
    return Partition(steps=steps, groups=groups)
