"""`slimfx config FILE` validates a configuration; `slimfx config --schema` lists every option."""

from __future__ import annotations

import argparse

from slimfx.compiler.config import describe_schema, load_config, to_toml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a .toml pass configuration to validate")
    p.add_argument("--schema", action="store_true", help="print every section and option with defaults and allowed values")


def main(args: argparse.Namespace) -> int:
    if args.schema or not args.file:
        print(describe_schema())
        return 0
    config = load_config(args.file)
    config.check_artifact_files()
    print(f"{args.file}: valid; pipeline '{config.compile['pipeline']}' = {config.pipeline}")
    print(to_toml(config.to_dict()))
    return 0
