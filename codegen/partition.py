"""Partition an ATen graph into fusion groups (networkx).

    partition(aten_gm) -> Partition(steps=[FusionGroup | fx.Node, ...] in execution order)

A fusion group is a connected set of fusable nodes with one iteration domain:

- "pointwise": every member has the same shape S; one flat index over S.
- "row": a domain rows x N, with any number of reductions over the last dim
  (sum/mean/amax/amin); members are either full (rows + [N]) or reduced
  (rows + [1] or rows). RMSNorm and softmax each become one row group.
- "matmul": one aten.mm [M, K] x [K, N] (a linear arrives as t + mm, or addmm with its bias),
  the views that only reshape its leading dims (linear's [M, N] -> [B, T, N]), and
  the pointwise groups that consume it over a domain that flattens to [M, N] (bias,
  activation, residual add, cast, SiLU * up): the epilogue, computed on the matmul's
  output tile before it is written (codegen/matmul_gen.py).

- a pointwise group may hold an aten.cat (is_fusable_cat): the pointwise chains that
  only feed one of its operands join the group as `inlined` members, computed at that
  operand's index (rotary's rotate_half: slice, neg, cat, mul, add in one kernel).
- "multi_matmul": up to three matmuls without epilogue multiplying the same A (a
  layer's Q, K, V projections), one launch (codegen/kernels/multi_gemv.py).

Matmul groups form in a second phase, after pointwise and row groups: a matmul takes
whole pointwise groups, never a row group (a reduction over N would span output
tiles). So a residual add that a following RMSNorm already took stays in the norm's
row group, and the SwiGLU product goes to the first projection that reads it.
Views of the matmul that are read outside the group are re-run as ATen views of
the stored matmul output after the group, so aliasing is eager's.
When a mm with no epilogue becomes a group: $SLIMFX_MATMUL (or partition's
`matmul` argument): "auto" (default) on CUDA only, where the autotuner measures
template against library; "all" everywhere (tests); "fused" only with an
epilogue; "off" never (every mm is an ATen call, as before).

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

import os
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
import torch.fx

from slimfx.codegen.ops import POINTWISE, REDUCTIONS, TRITON_DTYPE, Unsupported, _pow_scalar, aten, is_mutating, prims

ShapeKey = tuple  # tuple of str(size): symbolic sizes compare by expression, no guards


@dataclass
class FusionGroup:
    """Nodes fused into one kernel. `shape` is S (pointwise) or rows + (N,) (row)."""

    gid: int
    kind: str  # "pointwise" | "row" | "matmul"
    nodes: list = field(default_factory=list)  # fx.Node, topological order
    shape: tuple = ()  # sizes (int or SymInt) of the domain
    inputs: list = field(default_factory=list)  # external fx.Nodes read (tensors)
    outputs: list = field(default_factory=list)  # members read outside the group
    # Members computed at a cat operand's index, not over `shape` (see is_fusable_cat).
    inlined: set = field(default_factory=set)

    @property
    def name(self) -> str:
        ops = [n.target.__name__.split(".")[0] for n in self.nodes if hasattr(n.target, "__name__")]
        tag = "_".join(dict.fromkeys(o for o in ops if o not in ("mul", "add", "clone", "view", "_unsafe_view", "reshape")))[:40] or "pw"
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


def cat_dim(node: torch.fx.Node) -> int:
    out = _val(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % out.ndim


def is_fusable_cat(node: torch.fx.Node) -> bool:
    """An aten.cat a pointwise group can compute: its value at index i along `dim` is the
    operand covering i, read at i less the operand's offset (kernel_source._cat_expr).

    Operands: tensors of the output's dtype, device and rank, with a static, non-zero size
    along `dim` (so offsets are constants). The rotary embedding's rotate_half
    (cat([-x2, x1])) and its cos/sin table (cat([freqs, freqs])) are the cats this is for.
    """
    if node.op != "call_function" or node.target is not aten.cat.default or set(node.kwargs) - {"dim"}:
        return False
    out = _val(node)
    if not isinstance(out, torch.Tensor) or out.dtype not in TRITON_DTYPE or out.ndim == 0:
        return False
    operands = node.args[0]
    if not isinstance(operands, (list, tuple)) or len(operands) < 2:
        return False
    dim = cat_dim(node)
    for arg in operands:
        val = _val(arg)
        if not isinstance(val, torch.Tensor) or val.dtype != out.dtype or val.device != out.device or val.ndim != out.ndim:
            return False
        size = val.shape[dim]
        if not isinstance(size, int) or size == 0:
            return False
    return True


MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MATMUL_OPS = (aten.mm.default, aten.addmm.default)
VIEW_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
MATMUL_MODES = ("auto", "all", "fused", "off")


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_matmul(node: torch.fx.Node) -> bool:
    """An aten.mm [M, K] x [K, N] (or addmm: + beta * bias) the GEMM template can run.

    2-D float operands of one dtype and device; addmm's bias of that dtype, broadcast to
    [M, N], and scalar beta / alpha.
    """
    if node.op != "call_function" or node.target not in MATMUL_OPS:
        return False
    if node.target is aten.mm.default:
        if node.kwargs or len(node.args) != 2:
            return False
        operands = node.args
    else:
        if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"} or not all(_scalar(v) for v in node.kwargs.values()):
            return False
        operands = node.args
    out = _val(node)
    vals = [_val(a) for a in operands]
    if not isinstance(out, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in vals):
        return False
    if out.dtype not in MATMUL_DTYPES or out.ndim != 2 or any(t.dtype != out.dtype or t.device != out.device for t in vals):
        return False
    if node.target is aten.addmm.default and vals[0].ndim > 2:
        return False
    return not any(isinstance(s, int) and s == 0 for s in out.shape)


def _size_expr(size) -> sympy.Expr:
    return sympy.sympify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def flattens_to(shape, m, n) -> bool:
    """True if `shape` is [..., n] with the leading sizes multiplying to m (a [m, n] reshape)."""
    if len(shape) < 1 or str(shape[-1]) != str(n):
        return False
    lead = sympy.Mul(*[_size_expr(s) for s in shape[:-1]])
    return sympy.expand(lead - _size_expr(m)) == 0


def matmul_parts(group: "FusionGroup") -> tuple:
    """(mm / addmm node, its leading-dim views in the group, the epilogue members) of a matmul group."""
    [mm] = [n for n in group.nodes if n.target in MATMUL_OPS]
    chain = {mm}
    views = []
    for node in group.nodes:
        if node.target in VIEW_OPS and node.args[0] in chain:
            chain.add(node)
            views.append(node)
    epilogue = [n for n in group.nodes if n not in chain]
    return mm, views, epilogue


def _matmul_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("SLIMFX_MATMUL", "auto")
    if mode not in MATMUL_MODES:
        raise ValueError(f"slimfx partition: matmul mode {mode!r} unknown; allowed: {', '.join(MATMUL_MODES)}")
    return mode


def _row_domain(node: torch.fx.Node):
    src = _val(node.args[0])
    return _key(src.shape[:-1]), str(src.shape[-1]), tuple(src.shape)


def _fits_row(shape_key: ShapeKey, rows: ShapeKey, n: str) -> bool:
    return shape_key in (rows + (n,), rows + ("1",), rows)


# ----------------------------------------------------------------------------- the partitioner


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule, *, matmuls: bool = True):
        self.matmuls = matmuls
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
        self.inlined: dict = {}  # gid -> members computed at a cat operand's index

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
            if is_pointwise(n) or is_fusable_cat(n):
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
        if self.inlined.get(pw_gid):  # a cat's operands have other shapes: no row kernel for them
            return None
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

    def _merge(self, a: int, b: int, domain) -> None:
        self._contract(a, b)
        for m in self.members[b]:
            self.group_of[m] = a
        self.members[a].extend(self.members.pop(b))
        self.domain[a] = domain
        self.domain.pop(b, None)
        if b in self.inlined:
            self.inlined.setdefault(a, set()).update(self.inlined.pop(b))

    def try_merge(self, u: torch.fx.Node, v: torch.fx.Node) -> None:
        a, b = self.group_of[u], self.group_of[v]
        if a == b or self.epoch[u] != self.epoch[v]:
            return
        domain = self._merged_domain(a, b)
        if domain is None or self._creates_cycle(a, b):
            return
        self._merge(a, b, domain)

    def absorb_cat_operand(self, u: torch.fx.Node, cat: torch.fx.Node) -> None:
        """Move the pointwise group computing cat operand `u` into the cat's group, to be
        computed at the operand's index (FusionGroup.inlined), when nothing else reads it."""
        a, b = self.group_of[cat], self.group_of[u]
        db = self.domain.get(b)
        if a == b or db is None or db[0] != "pointwise" or db[1] != _key(_val(u).shape):
            return
        if self.inlined.get(b) or self.epoch[u] != self.epoch[cat]:
            return  # no cat inside a cat operand: one level of index remapping
        members = set(self.members[b])
        if any(user not in members and user is not cat for m in members for user in m.users):
            return
        if self._creates_cycle(a, b):
            return
        self._merge(a, b, self.domain[a])
        self.inlined.setdefault(a, set()).update(members)

    def run(self) -> None:
        self.seed()
        for v in self.nodes:
            if v.op != "call_function" or self.group_of[v] not in self.domain:
                continue
            if is_fusable_cat(v):
                for u in dict.fromkeys(v.args[0]):
                    self.absorb_cat_operand(u, v)
            for u in _tensor_args(v):
                if self.group_of.get(u) in self.domain:
                    self.try_merge(u, v)
        if self.matmuls:
            self.form_matmul_groups()
            self.merge_sibling_matmuls()

    # --------------------------------------------------------------------- phase 2: matmuls

    def form_matmul_groups(self) -> None:
        """Each mm takes its leading-dim views, then the pointwise groups reading them."""
        for node in self.nodes:
            if not is_matmul(node):
                continue
            gid = self.group_of[node]
            m, n = _val(node).shape
            # ("matmul", epilogue shape key or None, str(N), (M, N))
            self.domain[gid] = ("matmul", None, str(n), (m, n))
            for member in self._take_views(node, gid):
                for user in list(member.users):
                    self._take_epilogue(gid, member, user)

    def merge_sibling_matmuls(self) -> None:
        """Matmul groups without an epilogue that multiply the same A (Q, K, V projections of
        one hidden state) become one "multi_matmul" group of up to kernels/multi_gemv.MAX_OPERANDS: one launch."""
        from slimfx.codegen.kernels.multi_gemv import MAX_OPERANDS

        by_operand: dict = {}
        for gid, domain in list(self.domain.items()):
            if domain[0] != "matmul" or domain[1] is not None:
                continue
            [mm] = [n for n in self.members[gid] if n.target in MATMUL_OPS]
            if mm.target is not aten.mm.default:
                continue
            by_operand.setdefault((_operand_key(mm.args[0]), _val(mm).dtype, self.epoch[mm]), []).append(gid)
        for gids in by_operand.values():
            merged = gids[0]
            count = 1
            for gid in gids[1:]:
                if count == MAX_OPERANDS or self._creates_cycle(merged, gid):
                    merged, count = gid, 1
                    continue
                self._merge(merged, gid, ("multi_matmul",))
                count += 1

    def _take_views(self, mm: torch.fx.Node, gid: int) -> list:
        chain, stack = [mm], [mm]
        m, n = _val(mm).shape
        while stack:
            src = stack.pop()
            for user in list(src.users):
                val = _val(user)
                if user.target not in VIEW_OPS or user.args[0] is not src or not isinstance(val, torch.Tensor):
                    continue
                vid = self.group_of[user]
                if vid in self.domain or self.epoch[user] != self.epoch[mm] or not flattens_to(val.shape, m, n):
                    continue
                if self._creates_cycle(gid, vid):
                    continue
                self._merge(gid, vid, self.domain[gid])
                chain.append(user)
                stack.append(user)
        return chain

    def _take_epilogue(self, gid: int, member: torch.fx.Node, user: torch.fx.Node) -> None:
        pid = self.group_of[user]
        kind, epi_key, size_n, (m, n) = self.domain[gid]
        pw = self.domain.get(pid)
        if pid == gid or pw is None or pw[0] != "pointwise" or self.epoch[user] != self.epoch[member]:
            return
        if self.inlined.get(pid):  # the matmul epilogue computes over [M, N] only
            return
        if epi_key not in (None, pw[1]) or not flattens_to(pw[2], m, n):
            return
        # The epilogue runs after the K loop: nothing in it may feed the matmul itself.
        if gid in self.succ[pid] or self._creates_cycle(gid, pid):
            return
        self._merge(gid, pid, (kind, pw[1], size_n, (m, n)))


def _operand_key(node: torch.fx.Node):
    """Nodes that are the same value: the node itself, or a view of one base with the same
    size arguments (a linear's input flattened once per projection)."""
    if node.op == "call_function" and node.target in VIEW_OPS:
        return (node.target, node.args[0], tuple(str(a) for a in node.args[1:]))
    return node


def _multi_matmul_steps(gid: int, members: list, mode: str) -> tuple:
    """(FusionGroup or None, steps after it) for sibling matmuls (merge_sibling_matmuls).
    The products are the outputs; their leading-dim views re-run after as ATen views."""
    mms = [n for n in members if n.target in MATMUL_OPS]
    if not (mode == "all" or (mode == "auto" and _val(mms[0]).device.type == "cuda")):
        return None, members
    member_set = set(members)
    inputs, _ = _group_io(members, member_set)
    group = FusionGroup(gid=gid, kind="multi_matmul", nodes=members, shape=tuple(_val(mms[0]).shape),
                        inputs=inputs, outputs=mms)
    return group, [n for n in members if n not in mms]


def _group_io(members: list, member_set: set) -> tuple[list, list]:
    inputs: list = []
    for m in members:
        # Nested too: a view of a matmul in a dynamic graph takes SymInt nodes in its size list.
        nodes: list = []
        torch.fx.node.map_arg((m.args, m.kwargs), nodes.append)
        for arg in nodes:
            if arg not in member_set and arg not in inputs:
                inputs.append(arg)
    outputs = [m for m in members if any(user not in member_set for user in m.users)]
    return inputs, outputs


def _matmul_group_steps(gid: int, members: list, mode: str) -> tuple:
    """(FusionGroup or None, steps after it) for a matmul domain; None = run as ATen calls."""
    probe = FusionGroup(gid=gid, kind="matmul", nodes=members)
    mm, views, epilogue = matmul_parts(probe)
    if not epilogue and not (mode == "all" or (mode == "auto" and _val(mm).device.type == "cuda")):
        return None, members
    member_set = set(members)
    inputs, _ = _group_io(members, member_set)

    def outside(node) -> bool:
        return any(user not in member_set for user in node.users)

    outputs = [m for m in epilogue if outside(m)]
    # Views read outside run after the group as ATen views of the stored mm output.
    parents = {v: v.args[0] for v in views}
    needed = set()
    for view in views:
        if outside(view):
            while view in parents and view not in needed:
                needed.add(view)
                view = parents[view]
    if outside(mm) or needed:
        outputs.insert(0, mm)
    probe.inputs, probe.outputs, probe.shape = inputs, outputs, tuple(_val(mm).shape)
    return probe, [v for v in views if v in needed]


def partition(gm: torch.fx.GraphModule, *, matmul: str | None = None) -> Partition:
    """Fusion groups of `gm` (an ATen graph from lower_to_aten) and the order to run them.

    matmul: which mm nodes become matmul groups, "auto" | "all" | "fused" | "off"
    (module docstring; default $SLIMFX_MATMUL or "auto").
    """
    mode = _matmul_mode(matmul)
    b = _Builder(gm, matmuls=mode != "off")
    b.run()
    order = nx.lexicographical_topological_sort(b.contracted_graph(), key=lambda gid: gid)
    steps, groups = [], []
    for gid in order:
        members = sorted(b.members[gid], key=b.index.__getitem__)
        domain = b.domain.get(gid)
        if domain is not None and domain[0] == "multi_matmul":
            group, after = _multi_matmul_steps(len(groups), members, mode)
            if group is not None:
                groups.append(group)
                steps.append(group)
            steps.extend(after)
            continue
        if domain is not None and domain[0] == "matmul":
            group, after = _matmul_group_steps(len(groups), members, mode)
            if group is not None and group.outputs:
                groups.append(group)
                steps.append(group)
            if group is None or group.outputs:
                steps.extend(after)
            continue
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
        group = FusionGroup(gid=len(groups), kind=kind, nodes=members, shape=shape, inputs=inputs, outputs=outputs,
                            inlined=set(b.inlined.get(gid, ())))
        groups.append(group)
        steps.append(group)
    return Partition(steps=steps, groups=groups)
