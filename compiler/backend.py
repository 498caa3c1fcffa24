"""The `slimfx` torch.compile backend.

    torch.compile(model, backend="slimfx", options={"config": PATH_OR_DICT})

Registered through the `torch_dynamo_backends` entry point, so it works without
importing slimfx first. Dynamo hands over each captured graph; the backend finds
its anatomy, runs the configured pipeline, records a CompileReport and returns a
callable for the rewritten graph. With no configuration only lossless passes run.
"""

from __future__ import annotations

import time

import torch
import torch.fx

from slimfx.compiler.config import ConfigError, load_config
from slimfx.compiler.errors import is_user_error, through_dynamo
from slimfx.compiler.generate_hook import bind_generate
from slimfx.compiler.generate_hook import install as install_generate_hook
from slimfx.compiler.pipeline import run_pipeline

_OPTION_KEYS = ("config",)


def _unknown_option(key) -> ConfigError:
    from slimfx.compiler.config import _unknown_key

    return _unknown_key("options", key, _OPTION_KEYS)


def _config_from_options(options) -> object:
    if options is None:
        return load_config(None)
    if not isinstance(options, dict):
        raise ConfigError(f"options: got {type(options).__name__}; allowed: a dict like {{'config': PATH_OR_DICT}}")
    for key in options:
        if key not in _OPTION_KEYS:
            raise _unknown_option(key)
    return load_config(options.get("config"))


def _lower(gm: torch.fx.GraphModule, example_inputs, codegen: str):
    """Turn the rewritten graph into a callable.

    eager: the FX graph's own Python code (exact).
    inductor: hand the whole rewritten graph to inductor (to compare or fall back).
    slimfx: slimfx's own code generation (codegen/), replayed from CUDA graphs on CUDA.
    auto: the fastest for the graph's device (_auto_codegen).
    """
    if codegen == "auto":
        codegen = _auto_codegen(example_inputs)
    if codegen == "inductor":
        from slimfx.codegen.store_inputs import has_bound_tensors, lower_with_inductor

        if has_bound_tensors(gm):
            # Inductor treats attributes as constants: KV-store buffers must become
            # inputs or the attention op's in-place writes would be lost.
            return lower_with_inductor(gm, example_inputs), "inductor"
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs), "inductor"
    if codegen == "slimfx":
        from slimfx.codegen import compile_graph

        return compile_graph(gm, example_inputs), "slimfx"
    from slimfx.runtime.custom_ops import call_bodies_directly

    return call_bodies_directly(gm), "eager"


def _auto_codegen(example_inputs) -> str:
    """slimfx's code generation (Triton kernels, CUDA graphs for static shapes) on CUDA; the
    FX code on CPU. Measured on the 2-core CPU machine (SmolLM2-135M fp32, one thread,
    slimfx.runtime.generate, same prompt, one process, two alternating reps, load ~13):
    inductor decoded at 131 and 271 ms/token against 136 and 390 for the FX code, same
    tokens, but its C++ build of the model's graphs took 602 s against 98 s for the FX
    code's first call: inductor pays off only after thousands of tokens, and the FX code
    is bit-exact."""
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs)
    return "slimfx" if on_cuda else "eager"


def check_settings(settings: dict):
    """The Config that torch.compile's arguments for this backend (`{"options": ...}`)
    select, or the ConfigError the backend raises for them."""
    extra = sorted(k for k in settings if k != "options")
    if extra:
        raise ConfigError(f"slimfx backend: unexpected arguments {extra}; pass settings as options={{'config': ...}}")
    return _config_from_options(settings.get("options"))


def slimfx_backend(gm: torch.fx.GraphModule, example_inputs, options=None, **kwargs):
    """Dynamo backend entry: returns a callable equivalent to `gm` after the configured passes."""
    start = time.perf_counter()
    try:
        return run_pipeline(gm, example_inputs, check_settings({"options": options, **kwargs}), _lower, start=start)
    except ValueError as exc:
        if is_user_error(exc):  # the caller of the compiled model gets the one line, not dynamo's wrapper
            raise through_dynamo(exc) from None
        raise


def compile(model, config=None, **torch_compile_kwargs):
    """`torch.compile(model, backend="slimfx", options={"config": config})`, with the
    configuration validated now (a ConfigError here, not at the first call). An HF model's
    `generate` runs through slimfx's runtime (compiler/generate_hook.py)."""
    config = load_config(config)
    return bind_generate(torch.compile(model, backend="slimfx", options={"config": config}, **torch_compile_kwargs), config)


def _register_name() -> None:
    """backend="slimfx" also where slimfx is imported from a source tree rather than
    installed. Where the entry point exists, dynamo registers the name itself while it
    imports this module (registering it here too would be a duplicate)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    installed = any(ep.name == "slimfx" for ep in entry_points(group="torch_dynamo_backends"))
    if not installed and "slimfx" not in _COMPILER_FNS:
        register_backend(slimfx_backend, name="slimfx")


_register_name()
# HF generate on models compiled with this backend goes to slimfx's runtime; installed
# here because torch.compile(backend="slimfx") imports this module.
install_generate_hook(slimfx_backend, check_settings)
