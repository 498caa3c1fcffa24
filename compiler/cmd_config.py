"""`slimfx config FILE` validates a configuration; `slimfx config --schema` lists every option."""

from __future__ import annotations

import argparse

from slimfx.compiler.config import describe_schema, load_config, to_toml

DEFAULT_MODEL = "default"  # `--model` given without a value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a .toml pass configuration to validate")
    p.add_argument("--schema", action="store_true", help="print every section and option with defaults and allowed values")
    p.add_argument("--model", nargs="?", const=DEFAULT_MODEL, metavar="MODEL",
                   help="also check that the artifacts and per-layer overrides fit MODEL (a local HF folder or .gguf file; "
                        "without a value, the embedded default model `slimfx run` uses). Without --model the artifacts are "
                        "loaded and validated but not checked against a model: that needs its weights and graph "
                        "(50 s for the default model, measured on a busy 2-core CPU machine)")


def main(args: argparse.Namespace) -> int:
    if args.schema or not args.file:
        print(describe_schema())
        return 0
    config = load_config(args.file)
    config.check_artifacts()  # before any model loads: a bad file is refused at once
    fit = _check_fit(config, args.model) if args.model else "not checked against a model (--model checks it)"
    print(f"{args.file}: valid; pipeline '{config.compile['pipeline']}' = {config.pipeline}; artifacts {fit}")
    print(to_toml(config.to_dict()))
    return 0


def _check_fit(config, spec: str) -> str:
    """Artifacts and per-layer overrides checked against the model `spec` names, as the
    passes check them when `slimfx run` compiles it."""
    import torch

    from slimfx.compiler.anatomy import analyze, capture_graph
    from slimfx.compiler.passmanager import check_layer_overrides
    from slimfx.runtime.models import DEFAULT_MODEL_NAME, load_model

    model, _ = load_model(None if spec == DEFAULT_MODEL else spec)
    anatomy = analyze(capture_graph(model, torch.zeros(1, 8, dtype=torch.long)))
    for name in config.pipeline:
        check_layer_overrides(name, config.pass_config(name), anatomy)
    config.check_artifacts(model, anatomy)
    return f"fit {DEFAULT_MODEL_NAME if spec == DEFAULT_MODEL else spec}"
