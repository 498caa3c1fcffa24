"""Routes HF `generate` of a model compiled with the slimfx backend to slimfx's runtime.

    model = torch.compile(model, backend="slimfx", options=...)         # 1
    model.forward = torch.compile(model.forward, backend="slimfx", ...)  # 2
    model = slimfx.compile(model, config=...)                            # 3
    model.generate(...)    # all three: compiler/hf_generate.py, over slimfx.runtime.generate

Why a hook: `torch.compile(model)` returns an OptimizedModule whose `.generate` is the
original module's, which calls the original, uncompiled forward: the backend never runs.
And when only `forward` is compiled (2), HF's loop reaches the backend with graphs that
carry HF's DynamicCache, where the KV passes cannot act. So `generate` itself is routed.

`install()` runs when slimfx's backend module is imported (torch.compile(backend="slimfx")
imports it through the entry point). It is idempotent and narrow:
- OptimizedModule.__getattr__ answers `generate` with the routed one only when the module
  was compiled with slimfx's backend; every other name, and every other module, goes to
  torch's own __getattr__ unchanged.
- GenerationMixin.generate routes only when the model's own `forward` is a function
  compiled with slimfx's backend; every other call is HF's generate, unchanged. It is
  hooked when transformers.generation.utils is loaded (now, or right after it first
  loads), so importing the backend never imports transformers.
Which backend and options a compiled object has is read from torch's own objects: the
OptimizedModule's `dynamo_ctx` (a compiled function keeps it in its closure), whose
callback leads (`innermost_backend`) to torch's `_TorchCompileWrapper`, holding
`compiler_fn` and `kwargs["options"]`. `install()` first checks that this reading works
on this torch; where it does not, one warning line says that generate through
torch.compile runs HF's own loop without the passes that need the runtime, and
`slimfx.compile` (which binds its routed generate itself) still routes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable, NamedTuple

import torch

_HF_GENERATION = "transformers.generation.utils"
_MARK = "_slimfx_generate_hook"
_UNREADABLE = object()  # a slimfx-compiled object whose compile settings cannot be read
_NOT_APPLIED = ("passes that need slimfx's runtime (kv_eviction, kv_quantize, kv_runtime...) are not applied; "
                "slimfx.compile(model).generate or slimfx.runtime.generate apply them")


class Route(NamedTuple):
    """A generate call for slimfx's runtime: the HF model it runs and the settings
    torch.compile gave the slimfx backend (`{"options": ...}`, or _UNREADABLE)."""

    model: torch.nn.Module
    settings: object


class _Backend(NamedTuple):
    """What the hook needs of compiler/backend.py, handed over by install() (the backend
    imports this module, so this module does not import the backend)."""

    fn: Callable  # slimfx_backend: what torch.compile's wrapper holds as compiler_fn
    config_of: Callable  # torch.compile's settings for it -> Config, raising what the backend raises


_backend: _Backend | None = None


def install(backend_fn: Callable, config_of: Callable) -> None:
    """Route `generate` of models compiled with `backend_fn` to the runtime (idempotent);
    `config_of(settings)` validates torch.compile's settings for it, as the backend does."""
    global _backend
    _backend = _Backend(backend_fn, config_of)
    if not _torch_is_readable():
        warnings.warn(f"slimfx: cannot read torch {torch.__version__}'s compile settings: generate() of a model "
                      f"compiled with torch.compile(backend='slimfx') runs HF's own loop, so {_NOT_APPLIED}", stacklevel=2)
        return
    _hook_compiled_modules()
    _hook_hf_generate_when_loaded()


def bind_generate(compiled, config):
    """slimfx.compile's result, with a `generate` routed to the runtime set on the instance:
    path 3 does not depend on reading torch's objects."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(compiled, OptimizedModule):
        return compiled
    model = compiled._orig_mod
    if _hf_generate_of(model) is not None:
        # Into the instance dict: OptimizedModule.__setattr__ would set it on the original model.
        compiled.__dict__["generate"] = _routed(Route(model, {"options": {"config": config}}), model.generate)
    return compiled


# ----------------------------------------------------------------------------- reading torch's objects


def _backend_of_context(ctx) -> object:
    from torch._dynamo.eval_frame import innermost_backend

    callback = getattr(ctx, "callback", None)
    return innermost_backend(callback) if callable(callback) else None


def _context_of_function(fn) -> object:
    """The _TorchDynamoContext a torch.compile'd function closes over (its `self`)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return None
    cell = dict(zip(code.co_freevars, cells)).get("self")
    try:
        return cell.cell_contents if cell is not None else None
    except ValueError:  # an empty cell
        return None


def _slimfx_settings(backend) -> object:
    """`{"options": ...}` (and any other torch.compile argument for the backend) when
    `backend` is slimfx's, _UNREADABLE when it is but its settings are not where torch
    keeps them, None when it is another backend."""
    if backend is _backend.fn:  # torch._dynamo.optimize(slimfx_backend): no options
        return {}
    if getattr(backend, "compiler_fn", None) is not _backend.fn and getattr(backend, "compiler_name", None) != "slimfx":
        return None
    kwargs = getattr(backend, "kwargs", None)
    return dict(kwargs) if isinstance(kwargs, dict) else _UNREADABLE


def route_of_module(compiled) -> Route | None:
    """The Route of an OptimizedModule compiled with slimfx's backend; None otherwise."""
    ctx = compiled.__dict__.get("dynamo_ctx")
    model = compiled.__dict__.get("_modules", {}).get("_orig_mod")
    if ctx is None or model is None:
        return None
    settings = _slimfx_settings(_backend_of_context(ctx))
    return None if settings is None else Route(model, settings)


def route_of_forward(model) -> Route | None:
    """The Route of a model whose own `forward` was replaced by a function compiled with
    slimfx's backend (`model.forward = torch.compile(model.forward, backend="slimfx")`)."""
    fn = model.__dict__.get("forward")
    if fn is None:
        return None
    original = getattr(fn, "_torchdynamo_orig_callable", None)
    if getattr(original, "__self__", None) is not model:
        return None
    settings = _slimfx_settings(_backend_of_context(_context_of_function(fn)))
    return None if settings is None else Route(model, settings)


class _Probe(torch.nn.Module):
    """A module outside torch.nn, compiled the way a user's model is (torch.nn's own
    modules are wrapped differently by torch.compile)."""

    def forward(self, x):
        return x


def _torch_is_readable() -> bool:
    """Whether this torch keeps a compiled module's and function's backend settings where
    route_of_module / route_of_forward read them (checked on a throwaway module)."""
    try:
        probe = _Probe()
        options = {"config": None}
        compiled = torch.compile(probe, backend=_backend.fn, options=options)
        probe.forward = torch.compile(probe.forward, backend=_backend.fn, options=options)
        expected = {"options": options}
        return route_of_module(compiled) == (probe, expected) and route_of_forward(probe) == (probe, expected)
    except Exception:  # any torch that differs: reported by the caller, never raised at import
        return False


# ----------------------------------------------------------------------------- the hooks


def _hf_generate_of(model) -> Callable | None:
    """`model.generate` when it is HF's GenerationMixin.generate (hooked or not), else None."""
    module = sys.modules.get(_HF_GENERATION)
    if module is None:
        return None
    mixin = module.GenerationMixin
    return model.generate if isinstance(model, mixin) and type(model).generate is mixin.generate else None


def _run(route: Route, hf_generate: Callable, args: tuple, kwargs: dict):
    if route.settings is _UNREADABLE:
        warnings.warn(f"slimfx: cannot read the options of this slimfx-compiled model: HF's own generate runs, "
                      f"so {_NOT_APPLIED}", stacklevel=3)
        return hf_generate(*args, **kwargs)
    from slimfx.compiler import hf_generate as door

    _backend.config_of(route.settings)
    with _class_forward(route.model):
        return door.generate(route.model, (route.settings.get("options") or {}).get("config"), *args, **kwargs)


@contextlib.contextmanager
def _class_forward(model):
    """`model` with its class's forward while the runtime compiles and runs it. A forward
    replaced by torch.compile(model.forward, ...) would be a compiled function inside the
    runtime's own compiled step, and the runtime's graphs would guard on it: without it,
    all three ways in share one generator and its compiled graphs."""
    fn = model.__dict__.get("forward")
    if getattr(getattr(fn, "_torchdynamo_orig_callable", None), "__self__", None) is not model:
        yield
        return
    del model.__dict__["forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = fn


def _routed(route: Route, hf_generate: Callable) -> Callable:
    @functools.wraps(hf_generate)  # HF's name, docstring and signature for help() and inspect
    def generate(*args, **kwargs):
        return _run(route, hf_generate, args, kwargs)

    return generate


def _hook_compiled_modules() -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    original = OptimizedModule.__getattr__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __getattr__(self, name):
        value = original(self, name)
        if name != "generate":
            return value
        route = route_of_module(self)
        if route is None:
            return value
        if _hf_generate_of(route.model) is None:
            warnings.warn(f"slimfx: {type(route.model).__name__}.generate is not HF's, so it does not run through "
                          f"slimfx's runtime and {_NOT_APPLIED}", stacklevel=2)
            return value
        return _routed(route, value)

    setattr(__getattr__, _MARK, True)
    OptimizedModule.__getattr__ = __getattr__


def _hook_generation_mixin(mixin) -> None:
    original = mixin.generate
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        route = route_of_forward(self)
        if route is None:
            return original(self, *args, **kwargs)
        return _run(route, functools.partial(original, self), args, kwargs)

    setattr(generate, _MARK, True)
    mixin.generate = generate


def _hook_hf_generate_when_loaded() -> None:
    module = sys.modules.get(_HF_GENERATION)
    if module is not None:
        _hook_generation_mixin(module.GenerationMixin)
    elif not any(isinstance(finder, _HookAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookAfterImport())


class _HookAfterImport(importlib.abc.MetaPathFinder):
    """Hooks GenerationMixin.generate right after transformers.generation.utils first
    loads, then leaves the import system: importing transformers takes seconds, and a
    program without HF models never needs it."""

    def find_spec(self, name, path, target=None):
        if name != _HF_GENERATION:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _hook_generation_mixin(module.GenerationMixin)

            spec.loader.exec_module = exec_module
        return spec
