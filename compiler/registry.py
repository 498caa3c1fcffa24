"""The pass registry: which modules are passes, loaded by name on first use.

Every pass module defines

    NAME: str              # the name used in [pipelines] and [passes.NAME]
    DESCRIPTION: str       # one line for `slimfx inspect` and the README table
    LOSSY: bool            # True when the output can differ from the unmodified model
    OPTIONS: dict[str, slimfx.compiler.config.Option]
    def run(gm, cfg: PassConfig, ctx: PassContext) -> PassResult

and optionally RUNS_AFTER / RUNS_BEFORE (pass names it must run after / before: the
pass manager orders a pipeline by them),
`specialise(options, prompt_tokens)` (compiler/pipeline.py) and, for a pass that reads
artifacts, `check_artifacts(cfg, config, model=None, anatomy=None)`: load and validate
them with the loader run() uses and, given a model and its anatomy, check they fit it
(`Config.check_artifacts`, for `slimfx config` and `slimfx run`). See passes/README.md.

The compiler's core names the passes here but imports none of them statically: pass
modules build on the core (config, anatomy, the pass manager), so the core loads them
by name when a configuration is validated or a pipeline runs, and imports stay one way.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

PASS_MODULES = (
    "slimfx.passes.fold_noop_casts",
    "slimfx.passes.kv_runtime",
    "slimfx.passes.kv_eviction",
    "slimfx.passes.kv_quantize",
    "slimfx.passes.quantize",
    "slimfx.passes.vq_logits",
    "slimfx.passes.layer_skip",
    "slimfx.passes.kv_share",
)


@lru_cache(maxsize=None)
def registered_passes() -> dict:
    """name -> pass module, in registration order."""
    passes = {}
    for module_name in PASS_MODULES:
        module = importlib.import_module(module_name)
        for attr in ("NAME", "DESCRIPTION", "LOSSY", "OPTIONS", "run"):
            if not hasattr(module, attr):
                raise TypeError(f"pass module {module_name} lacks {attr}; see slimfx/compiler/registry.py")
        passes[module.NAME] = module
    return passes
