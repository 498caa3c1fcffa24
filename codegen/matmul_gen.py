"""Triton source for a matmul fusion group: GEMM/GEMV template + its epilogue + host wrapper.

    generate_matmul(group) -> (module source, host function name)

The kernels come from codegen/kernels/matmul_template.py; this file writes the part
that differs per group, the epilogue, from the same op tables and index algebra as
the pointwise and row kernels (ops.POINTWISE, triton_gen.row_offset):

- the epilogue's domain is the matmul's output [M, N] seen as rows x N: r is the
  flattened row (the leading dims of the epilogue's shape, e.g. [B, T] of a linear
  on [B, T, K]), c the column; inputs broadcast to it (a bias [N] reads at c, a
  residual [B, T, N] at r * N + c);
- the product and its leading-dim views are `acc` (rounded to the matmul's dtype,
  as eager stores it); each epilogue op is one line, rounded like eager;
- every output is stored once, from the tile in registers.

Generated host wrapper:

    def matmul_3_sigmoid(in0, in1, in2, *, config=None):
        s0 = in0.shape[0]                     # size symbols the epilogue uses
        out0 = torch.empty_strided(...)
        run_matmul(KERNELS, in0, in1, (in0, in1, in2, out0, s0), None, config)
        return (out0,)

`config` (a gemm config of autotune.gemm_space) bypasses the autotuner: the tests run
every config, the benchmark times template against library with it.
"""

from __future__ import annotations

import hashlib

import torch

from slimfx.codegen.kernels.matmul_template import TEMPLATE_VERSION, render_kernels
from slimfx.codegen.partition import FusionGroup, matmul_parts
from slimfx.codegen.ops import Val, aten, scalar_literal, tl_dtype
from slimfx.codegen.kernel_source import (
    HALF_DTYPES,
    C,
    R,
    _load_line,
    _member_expr,
    _needs_int64,
    _round_like_eager,
    _Source,
    _store_line,
    _symbol_bindings,
    _val,
    as_expr,
    code,
    row_offset,
)

MASKS = {frozenset(): None, frozenset({R}): "rmask", frozenset({C}): "cmask", frozenset({R, C}): "mask"}


def _product_line(src: _Source, mm: torch.fx.Node) -> str:
    """acc (fp32) as the value eager's mm / addmm returns, rounded once to its dtype.

    addmm: alpha * acc + beta * bias in fp32, then one rounding, as cuBLAS does
    (beta == 0 ignores the bias, NaNs included, as torch does).
    """
    expr = "acc"
    if mm.target is aten.addmm.default:
        alpha, beta = mm.kwargs.get("alpha", 1), mm.kwargs.get("beta", 1)
        if alpha != 1:
            expr = f"acc * {scalar_literal(alpha)}"
        if beta != 0:
            bias = src.names[mm.args[0]]
            expr = f"{expr} + {bias}" if beta == 1 else f"{expr} + {bias} * {scalar_literal(beta)}"
    dtype = _val(mm).dtype
    if dtype in HALF_DTYPES:
        return f"    mm = ({expr}).to({tl_dtype(dtype)}).to(tl.float32)"
    return f"    mm = {expr}"


def _epilogue_body(src: _Source, group: FusionGroup) -> list[str]:
    mm, views, epilogue = matmul_parts(group)
    n = group.shape[1]
    # Inputs broadcast to the epilogue's shape (all epilogue members share it).
    domain = _val(epilogue[0]).shape if epilogue else _val(mm).shape
    rows = domain[:-1]
    readers = {arg for node in epilogue for arg in node.args if isinstance(arg, torch.fx.Node)}
    bias = mm.args[0] if mm.target is aten.addmm.default else None
    for i, node in enumerate(group.inputs):
        if node in readers or node is bias:
            t = _val(node)
            src.names[node] = Val(f"a{i}", t.dtype)
            # addmm's bias broadcasts to the product [M, N]; epilogue inputs to the epilogue's shape.
            node_rows = _val(mm).shape[:-1] if node is bias and node not in readers else rows
            src.kernel.append(_load_line(src, i, node, row_offset(t.shape, t.stride(), node_rows, n), MASKS))
    src.kernel.append(_product_line(src, mm))
    for node in [mm, *views]:
        src.names[node] = Val("mm", _val(mm).dtype)
    for k, node in enumerate(epilogue):
        src.names[node] = Val(f"v{k}", _val(node).dtype)
        src.kernel.append(f"    v{k} = {_round_like_eager(_member_expr(src, node), node)}")
    for j, node in enumerate(group.outputs):
        t = _val(node)
        offset = row_offset(t.shape, t.stride(), t.shape[:-1], n)
        src.kernel.append(_store_line(src, j, node, offset, ("r", "c"), "mask"))
    return src.kernel


def _kernel_hash(kernel_text: str, name: str) -> str:
    # The group's name (it carries the group id) is left out, so the same matmul +
    # epilogue in every decoder layer shares one tuning result.
    normalized = kernel_text.replace(name, "KERNEL")
    return hashlib.sha256(f"matmul-template-{TEMPLATE_VERSION}\n{normalized}".encode()).hexdigest()[:24]


def _output_symbols(group: FusionGroup) -> set:
    """Size symbols the host needs to allocate the outputs (the kernel may not use them)."""
    found = set()
    for node in group.outputs:
        t = _val(node)
        for size in list(t.shape) + list(t.stride()):
            found |= as_expr(size).free_symbols
    return found


def _output_alloc(j: int, node: torch.fx.Node, like: str) -> str:
    t = _val(node)
    comma = "," if len(t.shape) == 1 else ""
    size = ", ".join(code(as_expr(s)) for s in t.shape)
    stride = ", ".join(code(as_expr(s)) for s in t.stride())
    return f"    out{j} = torch.empty_strided(({size}{comma}), ({stride}{comma}), dtype={t.dtype}, device={like}.device)"


def generate_matmul(group: FusionGroup) -> tuple[str, str]:
    """(module source, host function name) for a matmul group."""
    name = group.name
    mm, _, epilogue = matmul_parts(group)
    src = _Source()
    body = _epilogue_body(src, group)
    symbols = [str(s) for s in sorted(src.symbols, key=str)]
    ins = [f"in{i}" for i in range(len(group.inputs))]
    # Sizes among the inputs (a view's SymInts) reach the kernel as symbols, if it needs them.
    tensor_ins = [f"in{i}" for i, node in enumerate(group.inputs) if isinstance(_val(node), torch.Tensor)]
    outs = [f"out{j}" for j in range(len(group.outputs))]
    params = tensor_ins + outs + symbols
    a, b = (f"in{group.inputs.index(arg)}" for arg in mm.args[-2:])
    kernel_text = render_kernels(name, params, a, b, body, int64=_needs_int64(group))
    dtype_key = "/".join(str(_val(n).dtype).replace("torch.", "") for n in group.inputs + group.outputs
                         if isinstance(_val(n), torch.Tensor))
    # Without an epilogue the only output is the product (views are re-run outside).
    mm_out = "out0" if not epilogue else "None"
    host = [f"def {name}({', '.join(ins)}, *, config=None):"]
    host += _symbol_bindings(group, set(src.symbols) | _output_symbols(group))
    host += [_output_alloc(j, node, a) for j, node in enumerate(group.outputs)]
    host += [
        f"    run_matmul(KERNELS, {a}, {b}, ({', '.join(params)},), {mm_out}, config)",
        f"    return ({', '.join(outs)},)",
    ]
    header = [
        f'"""slimfx generated: {group.describe()}"""',
        "import torch",
        "import triton",
        "import triton.language as tl",
        "from slimfx.codegen.kernels.matmul_template import MatmulKernels, gemv_partial, run_matmul",
        "",
        f"KERNEL_HASH = {_kernel_hash(kernel_text, name)!r}",
        "",
    ]
    addmm = ""
    if mm.target is aten.addmm.default:
        alpha, beta = mm.kwargs.get("alpha", 1), mm.kwargs.get("beta", 1)
        addmm = f", bias={group.inputs.index(mm.args[0])}, alpha={alpha!r}, beta={beta!r}"
    footer = [
        f"KERNELS = MatmulKernels(KERNEL_HASH, {dtype_key!r}, {name}_gemv_kernel, {name}_dot_kernel,",
        f"                        {name}_epilogue_kernel, has_epilogue={bool(epilogue)}{addmm})",
    ]
    return "\n".join(header + [kernel_text, "", ""] + host + ["", ""] + footer) + "\n", name


def generate_multi_matmul(group: FusionGroup) -> tuple[str, str]:
    """(module source, host function name) for sibling matmuls sharing A (partition's
    "multi_matmul" group): the host calls kernels/multi_gemv.multi_matmul."""
    name = group.name
    mms = group.outputs
    ins = [f"in{i}" for i in range(len(group.inputs))]
    a = f"in{group.inputs.index(mms[0].args[0])}"  # the siblings' A operands are one value
    bs = [f"in{group.inputs.index(mm.args[1])}" for mm in mms]
    # Hash what decides the kernel's work (operand count, dtype, sizes), not the group id.
    signature = [(str(_val(mm).dtype), tuple(map(str, _val(mm.args[1]).shape))) for mm in mms]
    kernel_hash = hashlib.sha256(f"multi-gemv-{TEMPLATE_VERSION}\n{signature}".encode()).hexdigest()[:24]
    host = [f"def {name}({', '.join(ins)}, *, config=None):"]
    host += _symbol_bindings(group, _output_symbols(group))
    host += [_output_alloc(j, mm, a) for j, mm in enumerate(mms)]
    outs = [f"out{j}" for j in range(len(mms))]
    host += [
        f"    multi_matmul({a}, [{', '.join(bs)}], [{', '.join(outs)}], kernel_hash=KERNEL_HASH, config=config)",
        f"    return ({', '.join(outs)},)",
    ]
    header = [
        f'"""slimfx generated: {group.describe()}"""',
        "import torch",
        "from slimfx.codegen.kernels.multi_gemv import multi_matmul",
        "",
        f"KERNEL_HASH = {kernel_hash!r}",
        "",
    ]
    return "\n".join(header + host) + "\n", name
