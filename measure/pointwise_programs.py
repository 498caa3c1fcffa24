"""Random programs of pointwise ops and last-dim reductions, for checking slimfx codegen
against eager: the property test draws them with hypothesis, the CUDA benchmark with a
seeded `random.Random`, from the same tables and the same drawing rules."""

from __future__ import annotations

import operator

import torch
import torch.fx

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

# Each op keeps values bounded (|v| <~ a few), so tolerances stay meaningful.
UNARY = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "neg": torch.neg,
    "abs": torch.abs,
    "sin": torch.sin,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "rsqrt1": lambda v: torch.rsqrt(v * v + 1.0),
    "expneg": lambda v: torch.exp(-torch.abs(v)),
    "scale": lambda v: v * 0.5 + 0.25,
    "square": lambda v: v.pow(2),
    "f32_roundtrip": lambda v: v.float().to(v.dtype),
}
BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "max": torch.maximum,
    # Continuous at the tie a == b (both branches give 0): a comparison of values that
    # differ by an ulp may flip, and a jump there would exceed any tolerance.
    "where": lambda a, b: torch.where(a > b, a - b, (b - a) * 0.5),
}
REDUCE = {
    "sum": lambda v: v.sum(-1, keepdim=True) * 0.1,
    "mean": lambda v: v.mean(-1, keepdim=True),
    "amax": lambda v: v.amax(-1, keepdim=True),
    "softmax": lambda v: torch.softmax(v, -1),
    "rmsnorm": lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6),
}


def program_fn(program: list, n_inputs: int):
    """A function interpreting `program` ([(kind, name, operand indices)]) over its inputs."""

    def fn(*inputs):
        values = list(inputs)
        for kind, name, args in program:
            table = {"unary": UNARY, "binary": BINARY, "reduce": REDUCE}[kind]
            values.append(table[name](*(values[i] for i in args)))
        return tuple(values[n_inputs:][-2:])

    return fn


def draw_program(integers, choose):
    """(shape, dtype, input shapes, program) drawn through `integers(lo, hi)` (inclusive)
    and `choose(sequence)`, so any source of randomness can drive it."""
    ndim = integers(1, 3)
    shape = tuple(integers(1, 5) for _ in range(ndim - 1)) + (integers(2, 33),)
    dtype = choose([torch.float32, torch.float16, torch.bfloat16])
    # Inputs: the full shape, the last dim only (a weight), a keepdim-reduced shape (broadcast).
    input_shapes = [shape, shape[-1:], shape[:-1] + (1,)][: integers(1, 3)]
    program, n = [], len(input_shapes)
    for _ in range(integers(2, 7)):
        kind = choose(["unary", "binary", "reduce"])
        names = {"unary": UNARY, "binary": BINARY, "reduce": REDUCE}[kind]
        arity = 2 if kind == "binary" else 1
        args = tuple(integers(0, n - 1) for _ in range(arity))
        program.append((kind, choose(sorted(names)), args))
        n += 1
    return shape, dtype, input_shapes, program


def trace_program(fn, n_inputs):
    """An fx graph of `fn` over `n_inputs` positional inputs."""
    names = [f"in{i}" for i in range(n_inputs)]
    namespace = {"fn": fn}
    exec(f"def entry({', '.join(names)}):\n    return fn({', '.join(names)})", namespace)
    return torch.fx.symbolic_trace(namespace["entry"])
