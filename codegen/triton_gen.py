"""Triton source for one fusion group, its host wrapper, compilation and caching.

    compile_group(group) -> CompiledGroup      callable: (*input tensors) -> tuple of outputs

Generated module per group (readable; dumped to $SLIMFX_DEBUG_DIR on request):

    @triton.jit
    def pointwise_3_..._kernel(in0, in1, out0, s50, numel, BLOCK: tl.constexpr): ...
    def pointwise_3_...(in0, in1):            # host: sizes, outputs, grid, autotuned launch
    KERNEL_HASH = "..."                        # sha256 of the kernel source (autotune key)

Index and size expressions are sympy expressions over the symbols of the graph's
SymInts (a dynamic sequence length stays a kernel argument) and the program's index
variables: x (flat index, pointwise), r and c (row and column, row kernels). Static
sizes are folded, broadcast dims get stride 0, contiguous runs of dims merge, so a
contiguous operand is read at `x` and nothing more.

Kernel triplet (DESIGN decision 5): the `@triton.jit` kernel, the host wrapper above,
and `CompiledGroup.reference` (the group's own ATen nodes as an FX GraphModule), which
the tests compare against and which CPU runs when the Triton interpreter is off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from sympy.printing.str import StrPrinter

from slimfx.codegen.autotune import cache_root
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

    def use(self, expr: sympy.Expr) -> str:
        self.symbols |= {s for s in expr.free_symbols if s not in (X, R, C)}
        return code(expr)


def _operand(src: _Source, arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return src.names[arg]
    return Lit(scalar_literal(arg))


def _member_expr(src: _Source, node: torch.fx.Node) -> str:
    out_dtype = _val(node).dtype
    build = POINTWISE[node.target]
    if node.target is aten.pow.Tensor_Scalar:
        return build(out_dtype, _operand(src, node.args[0]), node.args[1])
    if node.target in (aten._to_copy.default, torch.ops.prims.convert_element_type.default, aten.clone.default):
        return build(out_dtype, _operand(src, node.args[0]))
    operands = [_operand(src, a) for a in node.args]
    kwargs = {"alpha": node.kwargs["alpha"]} if "alpha" in node.kwargs else {}
    return build(out_dtype, *operands, **kwargs)


def _reduction_expr(src: _Source, node: torch.fx.Node, size_n: str) -> str:
    combine, identity = REDUCTIONS[node.target]
    out_dtype = _val(node).dtype
    value = _cast(src.names[node.args[0]], out_dtype)
    reduced = f"tl.reduce(tl.where(mask, {value}, {identity}), 1, {combine})[:, None]"
    if node.target is aten.mean.dim:
        reduced = f"({reduced} / {size_n})"
    return reduced


def _needs_int64(group: FusionGroup) -> bool:
    tensors = [_val(n) for n in group.inputs + group.outputs]
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


def _emit_members(src: _Source, group: FusionGroup, size_n: str | None) -> None:
    for k, node in enumerate(group.nodes):
        expr = _reduction_expr(src, node, size_n) if node.target in REDUCTIONS else _member_expr(src, node)
        src.names[node] = Val(f"v{k}", _val(node).dtype)
        src.kernel.append(f"    v{k} = {_round_like_eager(expr, node)}")


def _kernel_pointwise(group: FusionGroup, name: str, int64: bool) -> tuple[_Source, list, str]:
    src = _Source()
    domain = group.shape
    numel = numel_expr(domain)
    pid = "tl.program_id(0).to(tl.int64)" if int64 else "tl.program_id(0)"
    src.kernel += [f"    x = {pid} * BLOCK + tl.arange(0, BLOCK)", "    xmask = x < numel"]
    masks = {frozenset(): None, frozenset({X}): "xmask"}
    for i, node in enumerate(group.inputs):
        src.names[node] = Val(f"a{i}", _val(node).dtype)
        t = _val(node)
        src.kernel.append(_load_line(src, i, node, linear_offset(t.shape, t.stride(), domain, X), masks))
    _emit_members(src, group, None)
    for j, node in enumerate(group.outputs):
        t = _val(node)
        src.kernel.append(_store_line(src, j, node, linear_offset(t.shape, t.stride(), domain, X), ("x",), "xmask"))
    src.use(numel)
    return src, ["numel"], "BLOCK: tl.constexpr"


def _kernel_row(group: FusionGroup, name: str, int64: bool) -> tuple[_Source, list, str]:
    src = _Source()
    rows, n = group.shape[:-1], group.shape[-1]
    n_code = src.use(as_expr(n))
    pid = "tl.program_id(0).to(tl.int64)" if int64 else "tl.program_id(0)"
    src.kernel += [
        f"    r = ({pid} * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]",
        "    c = tl.arange(0, BLOCK_N)[None, :]",
        "    rmask = r < nrows",
        f"    cmask = c < {n_code}",
        "    mask = rmask & cmask",
    ]
    masks = {frozenset(): None, frozenset({R}): "rmask", frozenset({C}): "cmask", frozenset({R, C}): "mask"}
    for i, node in enumerate(group.inputs):
        src.names[node] = Val(f"a{i}", _val(node).dtype)
        t = _val(node)
        src.kernel.append(_load_line(src, i, node, row_offset(t.shape, t.stride(), rows, n), masks))
    _emit_members(src, group, n_code)
    rows_key = tuple(str(s) for s in rows)
    for j, node in enumerate(group.outputs):
        t = _val(node)
        if tuple(str(s) for s in t.shape) == rows_key and len(t.shape) == len(rows):  # keepdim=False reduction
            offset, full = linear_offset(t.shape, t.stride(), rows, R), False
        else:
            offset = row_offset(t.shape, t.stride(), rows, n)
            full = str(t.shape[-1]) == str(n) if len(t.shape) else False
        index_vars, mask = (("r", "c"), "mask") if full else (("r",), "rmask")
        src.kernel.append(_store_line(src, j, node, offset, index_vars, mask))
    src.use(numel_expr(rows))
    return src, ["nrows"], "BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr"


# ----------------------------------------------------------------------------- host wrapper


def _symbol_bindings(group: FusionGroup, symbols: set) -> list[str]:
    """Host lines binding each size symbol to a runtime size/stride of an input."""
    lines, found = [], {}
    for i, node in enumerate(group.inputs):
        t = _val(node)
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)  # "torch.float32"


def generate(group: FusionGroup) -> tuple[str, str]:
    """(module source, kernel function name) for `group`."""
    name = group.name
    int64 = _needs_int64(group)
    if group.kind == "pointwise":
        src, domain_args, constexprs = _kernel_pointwise(group, name, int64)
    else:
        src, domain_args, constexprs = _kernel_row(group, name, int64)
    symbols = sorted(src.symbols, key=str)
    ins = [f"in{i}" for i in range(len(group.inputs))]
    outs = [f"out{j}" for j in range(len(group.outputs))]
    params = ins + outs + [str(s) for s in symbols] + domain_args
    kernel = [
        "@triton.jit",
        f"def {name}_kernel({', '.join(params)}, {constexprs}):",
        *src.kernel,
    ]
    host = [f"def {name}({', '.join(ins)}):"]
    host += _symbol_bindings(group, set(symbols))
    for j, node in enumerate(group.outputs):
        t = _val(node)
        size = ", ".join(code(as_expr(s)) for s in t.shape)
        stride = ", ".join(code(as_expr(s)) for s in t.stride())
        host.append(f"    out{j} = torch.empty_strided(({size}{',' if len(t.shape) == 1 else ''}), ({stride}{',' if len(t.shape) == 1 else ''}), dtype={_dtype_name(t.dtype)}, device=in0.device)")
    launch_args = ", ".join(params)
    dtype_key = "/".join(str(_val(n).dtype).replace("torch.", "") for n in group.inputs + group.outputs)
    if group.kind == "pointwise":
        numel = numel_expr(group.shape)
        host += [
            f"    numel = {code(numel)}",
            "    if numel == 0:",
            f"        return ({', '.join(outs)},)",
            "    def launch(cfg):",
            f"        {name}_kernel[(triton.cdiv(numel, cfg['BLOCK']),)]({launch_args}, BLOCK=cfg['BLOCK'], num_warps=cfg['num_warps'], num_stages=cfg['num_stages'])",
            f"    TUNER.launch(KERNEL_HASH, 'pointwise', (numel,), {dtype_key!r}, in0.device, launch)",
        ]
    else:
        rows, n = group.shape[:-1], group.shape[-1]
        nrows = numel_expr(rows)
        host += [
            f"    nrows = {code(nrows)}",
            f"    size_n = {code(as_expr(n))}",
            "    if nrows == 0:",
            f"        return ({', '.join(outs)},)",
            "    if size_n > MAX_ROW:",
            "        return None  # the row does not fit one block: the caller runs the ATen reference",
            "    block_n = triton.next_power_of_2(size_n)",
            "    def launch(cfg):",
            f"        {name}_kernel[(triton.cdiv(nrows, cfg['BLOCK_R']),)]({launch_args}, BLOCK_R=cfg['BLOCK_R'], BLOCK_N=block_n, num_warps=cfg['num_warps'], num_stages=cfg['num_stages'])",
            f"    TUNER.launch(KERNEL_HASH, 'row', (nrows, size_n), {dtype_key!r}, in0.device, launch)",
        ]
    host.append(f"    return ({', '.join(outs)},)")
    kernel_text = "\n".join(kernel)
    kernel_hash = hashlib.sha256(kernel_text.encode()).hexdigest()[:24]
    header = [
        f'"""slimfx generated: {group.describe()}"""',
        "import torch",
        "import triton",
        "import triton.language as tl",
        "from slimfx.codegen.autotune import TUNER",
        "",
        f"KERNEL_HASH = {kernel_hash!r}",
        f"MAX_ROW = {MAX_ROW}",
        "",
    ]
    return "\n".join(header + kernel + ["", ""] + host) + "\n", name


# Rows longer than this do not fit one block (registers); such groups run through ATen.
MAX_ROW = 16384


# ----------------------------------------------------------------------------- compile + cache

_MODULES: dict = {}


def load_module(source: str):
    """Write `source` to the kernel cache (by content hash) and import it, once per process."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest in _MODULES:
        return _MODULES[digest]
    folder = cache_root() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"k_{digest}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    module_name = f"slimfx_generated_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton.jit reads the source through inspect
    spec.loader.exec_module(module)
    _MODULES[digest] = module
    return module


def reference_module(group: FusionGroup) -> torch.fx.GraphModule:
    """The group's own ATen nodes as a GraphModule: (*inputs) -> tuple(outputs)."""
    graph = torch.fx.Graph()
    env = {}
    for i, node in enumerate(group.inputs):
        env[node] = graph.placeholder(f"in{i}")
        env[node].meta = dict(node.meta)
    for node in group.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in group.outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


class CompiledGroup:
    """One fusion group: Triton kernel on CUDA (or under the interpreter), else ATen."""

    def __init__(self, group: FusionGroup, *, generate_source: bool = True):
        self.group = group
        self.reference = reference_module(group)
        self.source = None
        self.kernel = None
        self.error = None
        self.interpret = interpreter_on()
        if not generate_source:  # CPU without the interpreter: only the reference runs
            self.error = "not generated (CPU without TRITON_INTERPRET runs ATen)"
            return
        try:
            self.source, name = generate(group)
        except Unsupported as exc:
            self.error = str(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a generator gap costs a kernel, not the compile
            self.error = f"code generation failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"slimfx codegen: {group.name}: {self.error}; it runs as ATen calls", stacklevel=2)
            return
        self._name = name

    def _kernel_fn(self):
        if self.kernel is None:
            self.kernel = getattr(load_module(self.source), self._name)
        return self.kernel

    def __call__(self, *inputs):
        if self.source is not None and (inputs[0].is_cuda or self.interpret):
            outputs = self._kernel_fn()(*inputs)
            if outputs is not None:
                return outputs
        return self.reference(*inputs)


def compile_group(group: FusionGroup, *, generate_source: bool = True) -> CompiledGroup:
    return CompiledGroup(group, generate_source=generate_source)
