"""`slimfx eval`: what a configuration costs in quality.

Runs the unmodified model and the model compiled with each configuration of a sweep on
the same inputs and reports side by side: passkey retrieval per prompt length and
depth, teacher-forced fidelity (top-1 agreement, mean KL, perplexity of both), and the
KV / weight / head bytes each keeps. Writes PREFIX.json, PREFIX.md and PREFIX.png.

    slimfx eval --pipeline off --output results/eval_baseline_default
    slimfx eval --config kv.toml --sweep kv.budget=128,256,512,1024
    slimfx eval --config kv.toml --sweep kv.budget_fraction=0.125,0.25 --ruler   # + the RULER-style suite

Deterministic: greedy decoding, seeded keys and prompts, fixed default text.
"""

from __future__ import annotations

import argparse
import sys

from slimfx.measure.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", default=None, help="slimfx TOML config (default: lossless passes only)")
    parser.add_argument("--pipeline", default=None, help="override [compile] pipeline; 'off' runs no passes (the baseline)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep a config value, e.g. kv.budget=128,256,512 (repeat for a grid)")
    parser.add_argument("--lengths", default="1024,2048,3072", help="passkey prompt lengths in tokens (comma list)")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="passkey depths in [0, 1] (comma list)")
    parser.add_argument("--trials", type=int, default=1, help="passkey prompts per (length, depth)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens decoded per passkey prompt")
    parser.add_argument("--text", default=None, help="UTF-8 text file for fidelity (default: the unmodified model's own greedy text)")
    parser.add_argument("--fidelity-tokens", type=int, default=1024, help="tokens scored for fidelity")
    parser.add_argument("--window", type=int, default=1024, help="--text: tokens per segment")
    parser.add_argument("--no-passkey", action="store_true", help="skip passkey retrieval")
    parser.add_argument("--ruler", action="store_true", help="also run the RULER-style synthetic suite (measure/ruler.py)")
    parser.add_argument("--ruler-lengths", default="1024", help="RULER prompt lengths in tokens (comma list)")
    parser.add_argument("--ruler-samples", type=int, default=2, help="RULER prompts per (task, length)")
    parser.add_argument("--ruler-tasks", default=None, help="comma list of RULER tasks (default: all seven)")
    parser.add_argument("--ruler-text", default=None, help="UTF-8 haystack text for the RULER needles (default: built in)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip fidelity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="results/eval", help="file stem: writes STEM.json, STEM.md, STEM.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _int_list(flag: str, text: str, lo: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma list of integers") from None
    if not values or min(values) < lo:
        raise UsageError(f"{flag} {text!r}: expected integers >= {lo}")
    return values


def _float_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma list of numbers") from None
    if not values or min(values) < 0 or max(values) > 1:
        raise UsageError(f"{flag} {text!r}: depths must lie in [0, 1]")
    return values


def plan(args: argparse.Namespace) -> dict:
    """Check every argument before the model loads (bad input fails in milliseconds).
    Returns the settings and the sweep's configurations."""
    from pathlib import Path

    from slimfx.compiler.config import load_config
    from slimfx.measure.report import output_paths
    from slimfx.measure.sweep import build_points, parse_axis

    from slimfx.measure.errors import model_source

    model_source(args.model)  # a missing model is a one-line error before anything loads
    from slimfx.measure.ruler import TASKS

    if args.no_passkey and args.no_fidelity and not args.ruler:
        raise UsageError("--no-passkey and --no-fidelity without --ruler leave nothing to measure")
    for flag, path in (("--text", args.text), ("--ruler-text", args.ruler_text)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    tasks = TASKS if args.ruler_tasks is None else tuple(t.strip() for t in args.ruler_tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--ruler-tasks {args.ruler_tasks!r}: unknown task {unknown[0] if unknown else ''!r}; allowed: {', '.join(TASKS)}")
    for flag, value in (("--trials", args.trials), ("--max-new-tokens", args.max_new_tokens), ("--ruler-samples", args.ruler_samples),
                        ("--fidelity-tokens", args.fidelity_tokens), ("--window", args.window)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    base = load_config(args.config).to_dict()  # ConfigError for a missing or malformed file
    if args.pipeline is not None:
        base["compile"]["pipeline"] = args.pipeline
        load_config(base)  # an unknown pipeline is the config's one-line error
    return {
        "lengths": _int_list("--lengths", args.lengths, 1),
        "depths": _float_list("--depths", args.depths),
        "ruler": {"lengths": _int_list("--ruler-lengths", args.ruler_lengths, 1), "tasks": list(tasks),
                  "samples": args.ruler_samples, "text": args.ruler_text} if args.ruler else None,
        "points": build_points(base, args.sweep),
        "axes": [parse_axis(s) for s in args.sweep],
        "base_config": base,
        "paths": output_paths(args.output),
    }


def main(args: argparse.Namespace) -> int:
    settings = plan(args)
    from slimfx.measure.eval_run import run_eval
    from slimfx.measure.eval_report import write_eval

    results = run_eval(args, settings)
    write_eval(results, settings["paths"])
    print("\n" + settings["paths"]["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in settings["paths"].values()), file=sys.stderr)
    return 0
