"""`slimfx inspect [MODEL]`: the model's anatomy as found in its dynamo graph."""

from __future__ import annotations

import argparse

import torch

from slimfx.compiler.errors import UsageError


# The probe only has to show the graph's structure; a huge one would allocate its
# attention scores (100M tokens: a 25 GB request on the tiny model).
MAX_PROBE_TOKENS = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct), "
                                        "or a package folder from `slimfx export` (prints its manifest)")
    p.add_argument("--tiny", metavar="ARCH", help="inspect a tiny random-weight model instead: llama_mha, llama_gqa, llama_untied, qwen2, mistral, phi3, gptfast")
    p.add_argument("--tokens", type=int, default=8, help="length of the probe input (default 8)")
    p.add_argument("--plan", metavar="PATH", help="also print a plan: bit allocation (slimfx calibrate bits: format and bytes per linear) "
                                                 "or layer skipping (slimfx calibrate skip: which blocks it removes) "
                                                 "or KV sharing (slimfx calibrate share: which layers read which)")
    p.add_argument("--config", metavar="TOML", help="also print the layer -> owner KV-sharing map the configuration's kv_share section gives this model")


def _is_package(path: str) -> bool:
    from pathlib import Path

    from slimfx.export.manifest import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def _inspect_package(path: str) -> int:
    """A package's manifest (its own checksum verified) and whether every file is as exported."""
    from slimfx.export.manifest import PackageError, read_manifest, verify_files
    from slimfx.export.package import describe_manifest

    manifest = read_manifest(path)
    print(describe_manifest(manifest))
    try:
        verify_files(manifest, path)
        print("files: all as exported (sha256 and sizes match the manifest)")
    except PackageError as exc:
        print(f"files: {exc}")
        return 1
    return 0


def _tiny(arch: str):
    from slimfx.runtime.models import TINY_ARCHITECTURES, tiny_model

    if arch == "gptfast":
        from slimfx.runtime.models import load_example_module

        module = load_example_module("gptfast_model")
        model = module.tiny_gptfast()
        return model, lambda ids: ((ids, torch.arange(ids.shape[1])), {})
    if arch not in TINY_ARCHITECTURES:
        raise UsageError(f"--tiny {arch}: unknown; allowed: {', '.join(TINY_ARCHITECTURES + ('gptfast',))}")
    return tiny_model(arch), lambda ids: ((ids,), {})


def _read(reader, path) -> dict:
    try:
        return reader(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(args: argparse.Namespace) -> int:
    from slimfx.compiler.anatomy import analyze, capture_graph
    from slimfx.compiler.config import load_config
    from slimfx.runtime.models import load_model

    if not 1 <= args.tokens <= MAX_PROBE_TOKENS:
        raise UsageError(f"--tokens {args.tokens}: allowed: an integer in [1, {MAX_PROBE_TOKENS}]")
    if args.model and _is_package(args.model):
        return _inspect_package(args.model)
    plan = _read_plan(args.plan) if args.plan else None  # a bad file is refused before the model loads
    config = load_config(args.config) if args.config else None
    if args.tiny:
        model, make_inputs = _tiny(args.tiny)
        vocab = model.tok_embeddings.num_embeddings if args.tiny == "gptfast" else model.config.vocab_size
        name = f"tiny {args.tiny} (random weights)"
    else:
        model, _ = load_model(args.model)
        vocab, name = model.config.vocab_size, args.model or "SmolLM2-135M-Instruct (embedded default)"
        make_inputs = lambda ids: ((ids,), {})
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    call_args, call_kwargs = make_inputs(ids)
    anatomy = analyze(capture_graph(model, *call_args, **call_kwargs))
    print(f"model: {name}")
    print(anatomy.table())
    windows = _config_windows(model)
    if windows:
        print(windows)
    if plan is not None:
        print()
        print(_format_plan(args.plan, plan, model, anatomy))
    if config is not None:
        from slimfx.passes.kv_share import describe_config

        print()
        print(describe_config(config, model, anatomy))
    return 0


def _plan_module(path: str):
    """The module that reads and prints the plan at `path`, by the kind the file declares
    (the bit-allocation plan's reader says what is wrong with a file that declares none)."""
    import json
    from pathlib import Path

    from slimfx.passes import layer_skip
    from slimfx.passes.kv_share import plan as share_plan
    from slimfx.passes.quantize import plan as bit_plan

    try:
        kind = json.loads(Path(path).read_text()).get("kind")
    except (OSError, ValueError, AttributeError, RecursionError):
        kind = None
    return {share_plan.PLAN_KIND: share_plan, layer_skip.PLAN_KIND: layer_skip}.get(kind, bit_plan)


def _read_plan(path: str) -> dict:
    return _read(_plan_module(path).read_plan, path)


def _config_windows(model) -> str | None:
    """The sliding windows the model's config names (what the runtime sizes and masks those
    sites by): the graph shows a window only where the probe is longer than it."""
    from slimfx.compiler.anatomy import fold_indices
    from slimfx.runtime.exactness import site_windows

    by_window: dict[int, list[int]] = {}
    for site, window in sorted(site_windows(model).items()):
        by_window.setdefault(window, []).append(site)
    if not by_window:
        return None
    return "sliding windows in the config (the runtime keeps a ring of the window there): " + "; ".join(
        f"sites {fold_indices(sites)}: {window}" for window, sites in by_window.items())


def _format_plan(path: str, plan: dict, model, anatomy) -> str:
    """A bit-allocation, layer-skip or KV-sharing plan as text; a layer-skip or KV-sharing
    plan made for another model is refused."""
    from slimfx.passes._identity import check_plan_model, identity_of_model
    from slimfx.passes.kv_share import plan as share_plan

    module = _plan_module(path)
    if module.__name__.endswith("quantize.plan"):
        return module.format_plan(plan)
    written_by = (share_plan.WRITTEN_BY,) if module is share_plan else ()
    check_plan_model(plan, identity_of_model(model, anatomy), f"--plan {path}", *written_by)
    return module.format_plan(plan)
