"""What every generated kernel's source is written from: the sympy index algebra (offsets
of strided operands over the program's index variables), the source being built
(`_Source`), the value of each node as Triton code, loads and stores, and the host's
size-symbol bindings. codegen/triton_gen.py writes pointwise and row kernels from these,
codegen/matmul_gen.py the matmul template's epilogues.

Index and size expressions are sympy expressions over the symbols of the graph's
SymInts (a dynamic sequence length stays a kernel argument) and the program's index
variables: x (flat index, pointwise), r and c (row and column, row kernels). Static
sizes are folded, broadcast dims get stride 0, contiguous runs of dims merge, so a
contiguous operand is read at `x` and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from sympy.printing.str import StrPrinter

from slimfx.codegen.ops import POINTWISE, Lit, Val, _cast, REDUCTIONS, Unsupported, aten, compute_dtype, scalar_literal, tl_dtype
from slimfx.codegen.partition import FusionGroup

INT32_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------- sympy index algebra


class FloorDiv(sympy.Function):
    """a // b for non-negative integers."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        return None


class ModIdx(sympy.Function):
    """a % m for non-negative integers."""

    is_integer = True

    @classmethod
    def eval(cls, a, m):
        if m == 1:
            return sympy.Integer(0)
        if a.is_Integer and m.is_Integer:
            return sympy.Integer(int(a) % int(m))
        return None


class _CodePrinter(StrPrinter):
    """Prints index expressions as Python/Triton integer arithmetic."""

    def _atom(self, e) -> str:
        text = self._print(e)
        return text if e.is_Atom or isinstance(e, (FloorDiv, ModIdx)) else f"({text})"

    def _print_FloorDiv(self, e):
        return f"({self._atom(e.args[0])} // {self._atom(e.args[1])})"

    def _print_ModIdx(self, e):
        return f"({self._atom(e.args[0])} % {self._atom(e.args[1])})"

    def _print_Pow(self, e):
        base, exp = e.args
        if exp.is_Integer and int(exp) > 0:
            return "(" + " * ".join([f"({self._print(base)})"] * int(exp)) + ")"
        raise Unsupported(f"index expression {e}")


def code(expr) -> str:
    return _CodePrinter().doprint(sympy.sympify(expr))


X, R, C = (sympy.Symbol(n, integer=True, nonnegative=True) for n in ("x", "r", "c"))


def as_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _is_one(e) -> bool:
    return e == 1


def linear_offset(shape, strides, domain, index) -> sympy.Expr:
    """Offset of element `index` (a flat index over `domain`) in a tensor broadcast to it.

    The tensor's dims align right to the domain's (torch broadcasting); size-1 and
    missing dims read with stride 0; runs of dims that are contiguous in the tensor
    merge into one, so a contiguous tensor is read at `index` itself.
    """
    shape, strides, domain = [as_expr(s) for s in shape], [as_expr(s) for s in strides], [as_expr(s) for s in domain]
    lead = len(domain) - len(shape)
    dims = []
    for i, dsize in enumerate(domain):
        t = i - lead
        stride = sympy.Integer(0) if t < 0 or (_is_one(shape[t]) and not _is_one(dsize)) else strides[t]
        if not _is_one(dsize):
            dims.append((dsize, stride))
    merged: list = []
    for size, stride in dims:
        if merged and sympy.expand(merged[-1][1] - stride * size) == 0:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    offset, inner = sympy.Integer(0), sympy.Integer(1)
    for j in reversed(range(len(merged))):
        size, stride = merged[j]
        if stride != 0:
            quotient = FloorDiv(index, inner)
            offset += (quotient if j == 0 else ModIdx(quotient, size)) * stride
        inner = inner * size
    return offset


def row_offset(shape, strides, rows, n) -> sympy.Expr:
    """Offset in a row kernel: tensor aligned right to rows + [n]; r indexes rows, c the last dim."""
    if len(shape) == 0:
        return sympy.Integer(0)
    col = sympy.Integer(0) if (_is_one(as_expr(shape[-1])) and not _is_one(as_expr(n))) else C * as_expr(strides[-1])
    return linear_offset(shape[:-1], strides[:-1], rows, R) + col


def numel_expr(shape) -> sympy.Expr:
    """Product of sizes as sympy (never torch.Size(...).numel(): that specializes SymInts)."""
    return sympy.Mul(*[as_expr(s) for s in shape]) if len(shape) else sympy.Integer(1)


def _span(shape, strides) -> sympy.Expr:
    return sum(((as_expr(s) - 1) * as_expr(st) for s, st in zip(shape, strides)), sympy.Integer(0)) + 1


# ----------------------------------------------------------------------------- kernel source


def _val(node):
    return node.meta["val"]


@dataclass
class _Source:
    kernel: list = field(default_factory=list)  # kernel body lines
    names: dict = field(default_factory=dict)  # fx.Node -> var name
    symbols: set = field(default_factory=set)
    local_vars: set = field(default_factory=set)  # index variables computed in the kernel (a cat's coordinate)

    def use(self, expr: sympy.Expr) -> str:
        # Sizes become kernel arguments; index variables and kernel locals do not.
        self.symbols |= {s for s in expr.free_symbols if s not in (X, R, C) and s not in self.local_vars}
        return code(expr)


def _operand(src: _Source, arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return src.names[arg]
    return Lit(scalar_literal(arg))


def _member_expr(src: _Source, node: torch.fx.Node, operand=None) -> str:
    """The Triton expression of pointwise member `node`; `operand(arg)` gives an argument's
    expression (default: its kernel variable)."""
    operand = operand or (lambda arg: _operand(src, arg))
    out_dtype = _val(node).dtype
    build = POINTWISE[node.target]
    if node.target is aten.pow.Tensor_Scalar:
        return build(out_dtype, operand(node.args[0]), node.args[1])
    if node.target in (aten._to_copy.default, torch.ops.prims.convert_element_type.default, aten.clone.default):
        return build(out_dtype, operand(node.args[0]))
    operands = [operand(a) for a in node.args]
    kwargs = {"alpha": node.kwargs["alpha"]} if "alpha" in node.kwargs else {}
    return build(out_dtype, *operands, **kwargs)


def _padded(t: torch.Tensor, rank: int) -> tuple[list, list]:
    """Shape and strides of `t` aligned right to `rank` dims (missing leading dims: size 1)."""
    lead = rank - t.ndim
    return [1] * lead + list(t.shape), [0] * lead + list(t.stride())


def _cat_operand_offset(t: torch.Tensor, op_shape, dim: int, outer, coord, rest) -> sympy.Expr:
    """Offset of element (outer, coord, rest) of a cat operand's domain `op_shape` in
    tensor `t` broadcast to it: `outer` flattens the dims before `dim`, `rest` those after."""
    shape, strides = _padded(t, len(op_shape))
    at_dim = sympy.Integer(0) if _is_one(as_expr(shape[dim])) and not _is_one(as_expr(op_shape[dim])) else coord * as_expr(strides[dim])
    before = linear_offset(shape[:dim], strides[:dim], op_shape[:dim], outer) if dim else sympy.Integer(0)
    after = linear_offset(shape[dim + 1:], strides[dim + 1:], op_shape[dim + 1:], rest)
    return before + at_dim + after


def _cat_expr(src: _Source, group: FusionGroup, node: torch.fx.Node, k: int) -> str:
    """aten.cat over the group's flat index x: each operand is computed (its inlined members)
    or loaded at x's coordinate along `dim` less the operand's offset, under a mask that
    keeps it to its own slice; tl.where picks the operand covering each element."""
    from slimfx.codegen.partition import cat_dim

    dim = cat_dim(node)
    domain = [as_expr(s) for s in group.shape]
    inner = numel_expr(group.shape[dim + 1:])
    size = domain[dim]
    outer, rest = FloorDiv(X, inner * size), ModIdx(X, inner)
    coord = f"cat{k}_i"
    src.kernel.append(f"    {coord} = {src.use(ModIdx(FloorDiv(X, inner), size))}")
    coord_sym = sympy.Symbol(coord, integer=True)
    src.local_vars.add(coord_sym)
    pieces, start = [], 0
    for p, arg in enumerate(node.args[0]):
        t = _val(arg)
        stop = start + t.shape[dim]
        bounds = ([f"({coord} >= {start})"] if start else []) + ([f"({coord} < {stop})"] if stop < size else [])
        mask = " & ".join(["xmask"] + bounds)
        offset_of = lambda leaf, shape=t.shape: _cat_operand_offset(leaf, shape, dim, outer, coord_sym - start, rest)  # noqa: E731
        pieces.append((stop, _value_at(src, group, arg, offset_of, mask, f"{k}_{p}")))
        start = stop
    expr = pieces[-1][1]
    for stop, value in reversed(pieces[:-1]):
        expr = f"tl.where({coord} < {stop}, {value}, {expr})"
    return expr


def _value_at(src: _Source, group: FusionGroup, node, offset_of, mask: str, tag: str) -> str:
    """`node`'s value at a cat operand's index: an inlined member is rebuilt from its own
    operands there, anything else is loaded there (once per operand)."""
    if not isinstance(node, torch.fx.Node):
        return Lit(scalar_literal(node))
    key = (node, tag)
    if key in src.names:
        return src.names[key]
    if node in group.inlined:
        expr = _member_expr(src, node, lambda arg: _value_at(src, group, arg, offset_of, mask, tag))
        name = f"v{group.nodes.index(node)}_{tag}"
        src.kernel.append(f"    {name} = {_round_like_eager(expr, node)}")
    else:
        i = group.inputs.index(node)
        name = f"a{i}_{tag}"
        dtype = tl_dtype(compute_dtype(_val(node).dtype))
        offset = offset_of(_val(node))
        # The pointer must carry the block's shape (the mask does) even for a broadcast read.
        index = src.use(offset) if offset.free_symbols & ({X} | src.local_vars) else f"{src.use(offset)} + 0 * x"
        src.kernel.append(f"    {name} = tl.load(in{i} + ({index}), mask={mask}, other=0).to({dtype})")
    src.names[key] = Val(name, _val(node).dtype)
    return src.names[key]


def _reduction_expr(src: _Source, node: torch.fx.Node, size_n: str) -> str:
    combine, identity = REDUCTIONS[node.target]
    out_dtype = _val(node).dtype
    value = _cast(src.names[node.args[0]], out_dtype)
    reduced = f"tl.reduce(tl.where(mask, {value}, {identity}), 1, {combine})[:, None]"
    if node.target is aten.mean.dim:
        reduced = f"({reduced} / {size_n})"
    return reduced


def _needs_int64(group: FusionGroup) -> bool:
    tensors = [_val(n) for n in group.inputs + group.outputs if isinstance(_val(n), torch.Tensor)]
    spans = [numel_expr(group.shape)]
    spans += [_span(t.shape, t.stride()) for t in tensors]
    return any(not s.is_Integer or int(s) > INT32_LIMIT for s in spans)


def _load_line(src: _Source, i: int, node, offset: sympy.Expr, masks: dict) -> str:
    free = offset.free_symbols & {X, R, C}
    mask = masks[frozenset(free)]
    dtype = tl_dtype(compute_dtype(_val(node).dtype))
    ptr = f"in{i} + ({src.use(offset)})" if offset != 0 else f"in{i}"
    if mask is None:
        return f"    {src.names[node]} = tl.load({ptr}).to({dtype})"
    return f"    {src.names[node]} = tl.load({ptr}, mask={mask}, other=0).to({dtype})"


def _store_line(src: _Source, j: int, node, offset: sympy.Expr, index_vars: tuple, mask: str) -> str:
    text = src.use(offset)
    # The pointer must carry the block's shape even when the offset does not use an index.
    used = {str(s) for s in offset.free_symbols}
    for var in index_vars:
        if var not in used:
            text = f"{text} + 0 * {var}"
    return f"    tl.store(out{j} + ({text}), ({src.names[node]}).to({tl_dtype(_val(node).dtype)}), mask={mask})"


HALF_DTYPES = (torch.float16, torch.bfloat16)
ROUNDS_ITSELF = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _round_like_eager(expr: str, node: torch.fx.Node) -> str:
    """Round a half-precision result to its storage dtype, as eager does after every op.

    Values stay fp32 in registers, but where the ATen graph says a value is fp16/bf16,
    eager has rounded it; keeping the unrounded value would make a later comparison
    (`a > b`, `where`) disagree with eager on ties such as `x > x.float().half()`.
    Upcasts the graph spells out (softmax, RMSNorm decompositions) keep fp32 intermediates.
    """
    dtype = _val(node).dtype
    if dtype not in HALF_DTYPES or node.target in ROUNDS_ITSELF:
        return expr
    return f"({expr}).to({tl_dtype(dtype)}).to(tl.float32)"


def _symbol_bindings(group: FusionGroup, symbols: set) -> list[str]:
    """Host lines binding each size symbol to a runtime size/stride of an input."""
    lines, found = [], {}
    for i, node in enumerate(group.inputs):
        t = _val(node)
        if isinstance(t, torch.SymInt):  # a size passed as a value (a matmul view's size list)
            expr = as_expr(t)
            if expr.is_Symbol and expr in symbols and expr not in found:
                found[expr] = f"in{i}"
            continue
        for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
            for kind, value in (("shape[%d]" % d, size), ("stride(%d)" % d, stride)):
                expr = as_expr(value)
                if expr.is_Symbol and expr in symbols and expr not in found:
                    found[expr] = f"in{i}.{kind}"
    missing = symbols - set(found)
    if missing:
        raise Unsupported(f"size symbols {sorted(map(str, missing))} are not sizes of the group's inputs")
    for sym in sorted(found, key=str):
        lines.append(f"    {sym} = {found[sym]}")
    return lines
