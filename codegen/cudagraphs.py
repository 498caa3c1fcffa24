"""CUDA-graph replay of a compiled step whose input shapes do not change (the decode step).

    CudaGraphStep(fn, static_inputs) -> callable with fn's signature

Per input-shape signature: the first call runs `fn` normally (Triton compiles,
the autotuner times its configs, cuBLAS initialises); the second call captures `fn`
into a CUDA graph and replays it; later calls only copy the changing inputs into
the graph's own buffers and replay.

Which inputs are copied: inputs listed in `static_inputs` (parameters, and tensors the
graph writes in place, such as KV caches) are used at their own address, never
copied; if such an input's address changes the call runs without the graph. Every
other tensor input (token ids, positions, masks) is copied into a private buffer.
Outputs are cloned out of the graph's memory, except outputs that alias a static
input, which are returned as they are.

Capture fails on graphs that synchronise with the host (`.item()`, data-dependent
shapes); then the step warns once and runs without CUDA graphs from then on.
"""

from __future__ import annotations

import warnings

import torch

MAX_GRAPHS = 8  # per compiled step: distinct input-shape signatures kept captured


def parameter_inputs(example_inputs) -> set[int]:
    """Indices of the inputs that are parameters: a captured step reads them where they are."""
    return {i for i, a in enumerate(example_inputs) if isinstance(a, torch.nn.Parameter)}


class _Captured:
    def __init__(self, graph, buffers, outputs, static_ptrs, alias_outputs):
        self.graph = graph
        self.buffers = buffers  # per input: our buffer, or None for static inputs
        self.outputs = outputs
        self.static_ptrs = static_ptrs  # input index -> data_ptr at capture
        self.alias_outputs = alias_outputs  # output indices returned without a clone

    def matches(self, args) -> bool:
        return all(args[i].data_ptr() == ptr for i, ptr in self.static_ptrs.items())

    def replay(self, args):
        for buf, arg in zip(self.buffers, args):
            if buf is not None:
                buf.copy_(arg, non_blocking=True)
        self.graph.replay()
        return _map_outputs(self.outputs, self.alias_outputs)


def _map_outputs(outputs, alias_outputs):
    flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    out = [o if (i in alias_outputs or not isinstance(o, torch.Tensor)) else o.clone() for i, o in enumerate(flat)]
    if isinstance(outputs, tuple):
        return tuple(out)
    if isinstance(outputs, list):
        return out
    return out[0]


class CudaGraphStep:
    def __init__(self, fn, static_inputs: set[int]):
        self.fn = fn
        self.static_inputs = set(static_inputs)
        self.graphs: dict = {}
        self.warm: set = set()
        self.disabled: str | None = None
        self.pool = None
        self.replays = 0  # tests and the benchmark read it

    def _signature(self, args):
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return None
        return tuple((tuple(a.shape), a.stride(), a.dtype) for a in args)

    def __call__(self, *args):
        # Inside someone else's capture (the generator captures its whole step): just run.
        if self.disabled or torch.cuda.is_current_stream_capturing():
            return self.fn(*args)
        key = self._signature(args)
        if key is None:
            return self.fn(*args)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm or len(self.graphs) >= MAX_GRAPHS:
                self.warm.add(key)
                return self.fn(*args)
            entry = self._capture(key, args)
            if entry is None:
                return self.fn(*args)
        if not entry.matches(args):
            return self.fn(*args)
        self.replays += 1
        return entry.replay(args)

    def _capture(self, key, args):
        buffers = [None if i in self.static_inputs else a.clone() for i, a in enumerate(args)]
        call_args = [a if b is None else b for a, b in zip(args, buffers)]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*call_args)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run without graphs
            self.disabled = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"slimfx codegen: CUDA-graph capture failed, running without CUDA graphs ({self.disabled})", stacklevel=2)
            return None
        static_ptrs = {i: args[i].data_ptr() for i in self.static_inputs if i < len(args)}
        storages = {args[i].untyped_storage().data_ptr() for i in self.static_inputs if i < len(args)}
        flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        alias = {j for j, o in enumerate(flat) if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in storages}
        entry = _Captured(graph, buffers, outputs, static_ptrs, alias)
        self.graphs[key] = entry
        return entry
