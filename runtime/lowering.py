"""The generator's backend: the configured passes, then a lowering that keeps the KV
store's buffers live, and prefill chunks replayed from CUDA graphs.

The passes run through the compiler's core (compiler/pipeline.py), as in the dynamo
backend, with FX code generation; the rewritten graph is lowered afterwards, because
the store's buffers must first become graph inputs (codegen/store_inputs.py).
"""

from __future__ import annotations

import time

import torch

from slimfx.compiler.config import load_config
from slimfx.compiler.pipeline import run_pipeline
from slimfx.runtime.custom_ops import call_bodies_directly


def _fx_code(lowered_by: str):
    """The rewritten graph as its FX code; runtime_backend lowers it afterwards with
    `lowered_by`, the name the graph's report gives."""
    return lambda gm, example_inputs, codegen: (gm.forward, lowered_by)


def runtime_backend(config: dict, codegen: str, on_graph=None):
    """A dynamo backend: the slimfx passes (incl. kv_runtime) then `codegen` ('eager' | 'inductor' | 'slimfx').
    on_graph(gm, example_inputs), when given, sees every rewritten graph before it is lowered
    (the ahead-of-time export collects them)."""

    def backend(gm, example_inputs, **_):
        start = time.perf_counter()
        run_pipeline(gm, example_inputs, load_config(config), _fx_code(codegen), start=start)
        if on_graph is not None:
            on_graph(gm, example_inputs)
        if codegen == "eager":
            # After on_graph: the export must see the custom ops, the FX code need not.
            return with_prefill_cudagraph(call_bodies_directly(gm), example_inputs)
        if codegen == "slimfx":
            from slimfx.codegen import compile_store_graph

            return with_prefill_cudagraph(compile_store_graph(gm, example_inputs), example_inputs)
        from slimfx.codegen.store_inputs import lower_with_inductor

        return with_prefill_cudagraph(lower_with_inductor(gm, example_inputs), example_inputs)

    return backend


def is_prefill_graph(example_inputs) -> bool:
    """A prefill-chunk graph: its token ids / positions (2-D int64 inputs) carry more than
    one token per sequence. The decode step's carry exactly one."""
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() == 2 and a.shape[1] > 1
               for a in example_inputs)


def with_prefill_cudagraph(run, example_inputs):
    """On CUDA, replay prefill-chunk graphs from CUDA graphs (codegen/cudagraphs.py).

    Why: a prefill chunk launches every kernel of the model once from Python; measured on
    the H100 (benchmarks/profile_runtime_prefill.py, Llama-3.2-1B shape, 4K prompt) the
    host took 357 ms for 45 ms of GPU work. Every chunk of a prompt has the same shapes
    and the store's buffers keep their addresses, so one captured graph serves them all.
    The decode step is left alone: the generator captures its whole step itself.
    SLIMFX_CUDAGRAPHS=0 turns this off."""
    from slimfx.codegen import use_cudagraphs

    if not (is_prefill_graph(example_inputs) and use_cudagraphs(example_inputs)):
        return run
    from slimfx.codegen.cudagraphs import CudaGraphStep, parameter_inputs

    # Parameters are used where they are; ids and positions are copied into the graph's
    # buffers each call. The store's buffers are not arguments here (bound inside `run`).
    return CudaGraphStep(run, parameter_inputs(example_inputs))
