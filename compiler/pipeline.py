"""One captured graph through a configuration: anatomy, the pass pipeline, the report.

Both backends compile through `run_pipeline`: the dynamo backend (compiler/backend.py)
and the generator's (runtime/lowering.py); each lowers the rewritten graph its own way.
Beside it, what the runtime asks of the pass manager without knowing any pass: a
pipeline with one more pass (`with_pass`, placed by the pass manager's ordering), a
configuration specialised for one prompt (`specialise`) and the prefill chunk a pass
needs (`prefill_chunk`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch.fx

from slimfx.compiler import registry
from slimfx.compiler.anatomy import record_parameter_paths
from slimfx.compiler.config import Config, load_config
from slimfx.compiler.passmanager import PassContext, PassManager, ordered
from slimfx.compiler.report import CompileReport, next_graph_id, record

# lower(gm, example_inputs, codegen) -> (callable, name of the codegen that made it)
Lower = Callable[[torch.fx.GraphModule, list, str], tuple[Callable, str]]


def run_pipeline(gm: torch.fx.GraphModule, example_inputs, config: Config, lower: Lower, *, start: float | None = None):
    """Find `gm`'s anatomy, run `config`'s pipeline over it in place, lower it with
    `lower(gm, example_inputs, config.compile["codegen"])` and record a CompileReport
    (compile time counted from `start`, default now). Returns the lowered callable."""
    start = time.perf_counter() if start is None else start
    ctx = PassContext(config=config, example_inputs=list(example_inputs), graph_id=next_graph_id())
    record_parameter_paths(gm, example_inputs)
    anatomy = ctx.refresh_anatomy(gm)
    results = PassManager(config).run(gm, ctx)
    compiled, codegen = lower(gm, example_inputs, config.compile["codegen"])
    report = CompileReport(
        graph_id=ctx.graph_id,
        config_source=config.source,
        pipeline_name=config.compile["pipeline"],
        anatomy_summary=anatomy.summary(),
        passes=results,
        codegen=codegen,
        compile_seconds=time.perf_counter() - start,
    )
    record(report)
    if config.compile["verbose"]:
        print(report.format())
    return compiled


def specialise(config, prompt_tokens: int):
    """`config` (a Config, dict or TOML path) specialised for a prompt of `prompt_tokens`
    tokens (the longest of a batch) by every configured pass with a hook
    `specialise(options, prompt_tokens) -> options | None`: kv_eviction turns a
    `budget_fraction` into an absolute budget, so each prompt-length bucket compiles once.
    Returns `config` itself when no pass changes anything, else the specialised raw dict."""
    cfg = load_config(config)
    raw, changed = cfg.to_dict(), False
    for name, module in registry.registered_passes().items():
        hook = getattr(module, "specialise", None)
        if hook is None or name not in cfg.passes:
            continue
        options = hook(raw["passes"][name], prompt_tokens)
        if options is not None:
            raw["passes"][name] = options
            changed = True
    return raw if changed else config


def prefill_chunk(config, prompt_tokens: int, chunk: int) -> int:
    """The prefill chunk for a prompt `prompt_tokens` wide: `chunk`, unless a configured
    pass with a hook `prefill_chunk(options, prompt_tokens, chunk) -> int` needs another
    (kv_eviction: the whole prompt in one chunk when it compresses after the prompt)."""
    cfg = load_config(config)
    raw = cfg.to_dict()
    for name, module in registry.registered_passes().items():
        hook = getattr(module, "prefill_chunk", None)
        if hook is not None and name in cfg.passes and name in raw["pipelines"].get(raw["compile"]["pipeline"], ()):
            chunk = hook(raw["passes"][name], prompt_tokens, chunk)
    return chunk


def with_pass(pipeline: list[str], name: str) -> list[str]:
    """`pipeline` with pass `name` where the pass manager runs it (passmanager.ordered):
    before the first pass that works on its output, as kv_eviction does kv_runtime's."""
    return ordered(pipeline + [name], registry.registered_passes())
