"""The `slimfx` command line: run | inspect | config | eval | bench.

Every command exits 2 with one line on stderr for bad input (a config error, a
missing model), never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from slimfx.compiler.config import ConfigError
from slimfx.compiler.errors import is_user_error, one_line, user_errors

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")

# Commands that live in their own modules: name -> (module, help). A module that is
# not present in this build is simply not offered.
COMMAND_MODULES = {
    "run": ("slimfx.compiler.cmd_run", "generate with a model compiled by slimfx (default: SmolLM2-135M)"),
    "inspect": ("slimfx.compiler.cmd_inspect", "print a model's anatomy as found in its graph"),
    "config": ("slimfx.compiler.cmd_config", "validate a pass-configuration file or print the schema"),
    "eval": ("slimfx.measure.eval_cmd", "what a configuration costs in quality (passkey, fidelity, bytes)"),
    "bench": ("slimfx.measure.bench_cmd", "what a configuration buys in speed (GPU)"),
    "export": ("slimfx.compiler.cmd_export", "write a package that generates without compiling (passes applied once)"),
    "calibrate": ("slimfx.compiler.cmd_calibrate", "compute calibration artifacts (codebooks, plans, head choices)"),
}


def _available() -> dict:
    out = {}
    for name, (module, help_text) in COMMAND_MODULES.items():
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            out[name] = (module, help_text)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other slimfx error (argparse
    prints the usage first; `slimfx COMMAND --help` shows it)."""

    def error(self, message):
        self.exit(2, f"slimfx: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser lists every command from COMMAND_MODULES' help texts; only `command`'s
    module is imported (to add its arguments), because the command modules import torch
    and `slimfx --help` should answer at once."""
    parser = _Parser(prog="slimfx", description="slimfx: a torch.compile backend that makes LLM inference cheaper")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            cmd = importlib.import_module(module)
            cmd.add_arguments(p)
            p.set_defaults(_main=cmd.main)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    # The top-level parser takes no option with a value, so the first word that is
    # not an option names the command.
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _run_unwrapped(args) -> int:
    """Run a command; a user error raised inside the backend (dynamo wraps it in
    BackendCompilerFailed) is re-raised as itself so it prints as one line."""
    with user_errors():
        return int(args._main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return _run_unwrapped(args)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except ValueError as exc:
        if not is_user_error(exc):
            raise
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"slimfx: {kind}: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
