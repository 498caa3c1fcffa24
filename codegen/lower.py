"""Lower the rewritten dynamo graph to an ATen graph for code generation.

    lower_to_aten(gm, example_inputs) -> torch.fx.GraphModule   (ATen overloads only)

The dynamo graph is retraced with `make_fx` over the fake tensors dynamo already
made for it (same ShapeEnv, so symbolic sizes stay symbolic: a dynamic sequence
length arrives as a SymInt placeholder and as `sym_size` expressions). A short,
deliberate decomposition list (ops.DECOMPOSE) breaks softmax, SiLU, GELU, linear and
RMSNorm into the pointwise ops and reductions the partitioner fuses; everything
else (SDPA, mm, embedding, the project's `torch.ops.slimfx.*` custom ops) stays one
node and runs as a library call.

Invariant kept (DESIGN decision 9): the graph is ATen-level but NOT functionalized.
In-place writes (KV-cache `index_copy_`, the mutating `slimfx::attention` op) stay
in place, because functionalization would turn a cache write into clone + copy-back
of the whole cache every decode step. The partitioner keeps the order of reads and
writes instead (it never fuses across a mutating node).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from slimfx.codegen.ops import DECOMPOSE


class LoweringError(RuntimeError):
    """The graph could not be retraced to ATen; the caller falls back to the FX graph."""


def _fake_inputs(example_inputs, traced_inputs: int | None = None):
    """Dynamo's fake tensors for the inputs, with their symbolic sizes, if dynamo compiled this.

    Placeholder `example_value` metadata is not used: passes may overwrite it with
    concrete shapes. Dynamo's FakeTensorMode memoizes real -> fake conversions, so
    `from_tensor` on an example input returns the very fake (symbolic sizes included)
    dynamo traced with.
    """
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return None, None
    fakes = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
            # Dynamo's own inputs (the first `traced_inputs`) come back from the memo with
            # their symbolic sizes. Inputs appended after them (compile_store_graph's KV-store
            # buffers) get static sizes: a fresh symbol has no source, and a guard on it broke
            # dynamo's guard code (IndexError in produce_guards, torch 2.11, int8 weights + store).
            extra = traced_inputs is not None and i >= traced_inputs
            x = fake_mode.from_tensor(x, static_shapes=True) if extra else fake_mode.from_tensor(x)
        fakes.append(x)
    return fake_mode, fakes


def lower_to_aten(gm: torch.fx.GraphModule, example_inputs, *, decompose: bool = True, traced_inputs: int | None = None) -> torch.fx.GraphModule:
    """Retrace `gm` to ATen ops (inference only).

    decompose=False keeps softmax, SiLU, ... whole: for CPU runs through the ATen
    reference, where the fused library ops are bit-identical to eager and their
    decompositions are not. traced_inputs: how many leading inputs dynamo traced (the
    rest, appended by the caller, get static fake sizes); None = all of them.
    """
    decompositions = torch._decomp.get_decompositions(DECOMPOSE) if decompose else {}
    fake_mode, fake_args = _fake_inputs(example_inputs, traced_inputs)
    try:
        with torch.no_grad():
            if fake_mode is not None:
                from torch._dispatch.python import enable_python_dispatcher

                # Graph constants (tensors created in the model) are real tensors.
                allow = fake_mode.allow_non_fake_inputs
                fake_mode.allow_non_fake_inputs = True
                try:
                    with fake_mode, enable_python_dispatcher():
                        traced = make_fx(gm, decomposition_table=decompositions, tracing_mode="real")(*fake_args)
                finally:
                    fake_mode.allow_non_fake_inputs = allow
            else:
                # A graph that did not come from dynamo (tests, direct callers): fresh fakes.
                traced = make_fx(gm, decomposition_table=decompositions, tracing_mode="fake", _allow_non_fake_inputs=True)(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "no lowering"
        raise LoweringError(f"make_fx could not retrace the graph: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    # Dead values would become kernels without outputs; mutating ops count as impure and stay.
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced
