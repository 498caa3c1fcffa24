"""`slimfx run`: load a model (the embedded SmolLM2-135M by default), compile it with
the slimfx backend and a configuration, answer a chat prompt through the fast
generation loop (slimfx.runtime.generate), and print the text plus a short table:
prefill and decode time, tokens/s, KV bytes, what each pass did."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slimfx.compiler.config import load_config
from slimfx.compiler.errors import UsageError
from slimfx.compiler.passmanager import format_bytes
from slimfx.compiler.report import clear_reports, reports
from slimfx.compiler.tables import format_table

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --config, --dtype and --device, as `run` and `export` take them."""
    p.add_argument("--model", help="a local HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", help="a pass configuration (.toml); default: lossless passes only")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (the model's chat template is applied)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of as it is generated")
    p.add_argument("--capacity", type=int, default=None,
                   help="KV slots per attention site (default: the prompt and the whole answer); less than the prompt "
                        "+ max-new-tokens - 1 is refused unless --sliding-window")
    p.add_argument("--sliding-window", action="store_true",
                   help="with --capacity below the request: keep only the --capacity most recent tokens per site (lossy; "
                        "the table says so) instead of refusing")
    p.add_argument("--package", help="a package from `slimfx export`: generate with it (no compiling; --model/--config/--dtype come from it)")


def _check(args) -> str:
    """Arguments checked before the model loads (seconds to minutes)."""
    from slimfx.runtime.generate import GenerateError, check_generate_args

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: allowed: an integer >= 1")
    if args.capacity is not None and args.capacity < 1:
        raise UsageError(f"--capacity {args.capacity}: allowed: an integer >= 1")
    if args.sliding_window and args.capacity is None:
        raise UsageError("--sliding-window without --capacity: the default capacity holds the whole request; "
                         "allowed: --capacity N with it")
    try:
        check_generate_args(args.max_new_tokens, 0, 16, 8, args.temperature, args.top_k, args.top_p)
    except GenerateError as exc:  # named as the flag the user typed
        flag, _, rest = str(exc).partition(":")
        raise UsageError(f"--{flag.replace('_', '-')}:{rest}") from None
    return check_device(args.device)


def model_dtype(name: str | None, device: str) -> torch.dtype:
    """The weights dtype `--dtype` names, else float32 on CPU and bfloat16 on CUDA."""
    return DTYPES[name] if name else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def check_device(device: str | None) -> str:
    """The device to run on: `device` when this machine has it, else a one-line UsageError."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device on this machine; allowed: cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: allowed: cpu, cuda, cuda:N")
    return device


class _Printer:
    """Streams decoded text: re-decodes the whole answer and prints what is new, so
    multi-token characters come out whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, tokens: torch.Tensor, first_index: int) -> None:
        self.ids.extend(int(t) for t in tokens[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def main(args: argparse.Namespace) -> int:
    from slimfx.runtime import generate
    from slimfx.runtime.models import chat_input_ids, kv_fit_problem, load_model

    if args.package:
        return _run_package(args)
    device = _check(args)
    dtype = model_dtype(args.dtype, device)
    config = load_config(args.config or _default_config_path())  # fail fast, before loading weights
    config.check_artifacts()  # files exist, load and validate (fit to the model: when its passes run)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    clear_reports()
    input_ids = chat_input_ids(tokenizer, args.prompt).to(device)
    capacity = _capacity(args, model, input_ids.shape[1])
    problem = kv_fit_problem(model, capacity)
    if problem:
        flag = f"--capacity {capacity}" if args.capacity else f"--max-new-tokens {args.max_new_tokens}"
        raise UsageError(f"{flag}: {problem} of prompt and answer")
    printer = None if args.no_stream else _Printer(tokenizer)
    tokens, stats = generate(
        model, input_ids, max_new_tokens=args.max_new_tokens, capacity=capacity, sliding_window=args.sliding_window,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        config=config, callback=printer, stream_interval=8,
    )
    # The streamed text is a prefix of the whole answer: print what has not been shown.
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    print(answer if printer is None else answer[len(printer.shown):], end="\n\n")
    _print_stats(args, device, dtype, load_s, input_ids, tokens, tokenizer, stats)
    return 0


def _capacity(args, model, prompt_tokens: int) -> int:
    """KV slots per site: --capacity (refused, named as the flags, when below the request
    without --sliding-window), else the prompt and the whole answer."""
    from slimfx.runtime.generate import check_capacity

    if args.capacity is None:
        return prompt_tokens + args.max_new_tokens
    check_capacity(model, args.capacity, None, prompt_tokens, args.max_new_tokens, args.sliding_window,
                   names=("--capacity", "--capacity", "--sliding-window"))
    return args.capacity


def _run_package(args) -> int:
    from slimfx.export.package import load_package
    from slimfx.runtime.models import chat_input_ids

    for flag in ("model", "config", "dtype", "capacity", "sliding_window"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} with --package: the package fixes the model, passes, dtype and KV "
                             "capacity; allowed: one of the two")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: allowed: an integer >= 1")
    t0 = time.perf_counter()
    pkg = load_package(args.package, device=args.device)
    load_s = time.perf_counter() - t0
    tokenizer = pkg.tokenizer
    if tokenizer is None:
        raise UsageError(f"--package {args.package}: it holds no tokenizer; allowed: a package exported with one (slimfx export)")
    input_ids = chat_input_ids(tokenizer, args.prompt)
    printer = None if args.no_stream else _Printer(tokenizer)
    tokens, stats = pkg.generate(input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, callback=printer, stream_interval=8)
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    print(answer if printer is None else answer[len(printer.shown):], end="\n\n")
    args.model = f"package {args.package} ({pkg.manifest['model']['name']})"
    _print_stats(args, str(pkg.device), pkg.manifest["model"]["dtype"], load_s, input_ids, tokens, tokenizer, stats)
    return 0


def _print_stats(args, device, dtype, load_s, input_ids, tokens, tokenizer, stats) -> None:
    from slimfx.runtime.models import DEFAULT_MODEL_NAME

    new = int((tokens[0] != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else tokens.shape[1]
    print(format_table(["", "value"], [
        ["model", args.model or DEFAULT_MODEL_NAME],
        ["device / dtype", f"{device} / {str(dtype).removeprefix('torch.')}"],
        ["load", f"{load_s:.1f} s"],
        ["prompt tokens", int(input_ids.shape[1])],
        ["new tokens", new],
        ["prefill (first call compiles)", f"{stats['prefill_s'] * 1e3:.0f} ms"],
        ["decode warm-up (compile, capture)", f"{stats['warmup_s'] * 1e3:.0f} ms"],
        ["decode", f"{stats['decode_s'] * 1e3:.0f} ms for {stats['decode_steps']} steps ({stats['ms_per_step']:.1f} ms/token)"],
        ["decode tokens/s", f"{stats['tokens_per_s']:.1f}"],
        ["KV bytes (store)", format_bytes(stats["kv_bytes"])],
        ["KV sliding window", f"{stats['sliding_window']} most recent tokens per site (lossy)" if stats.get("sliding_window")
         else "no"],
        ["CUDA graph", "yes" if stats.get("cuda_graph") else "no"],
        ["graphs compiled", len(reports())],
    ]))
    for report in reports():  # every graph: the prefill chunk's notes differ from the decode step's
        print()
        print(report.format())
    sys.stdout.flush()


def _default_config_path():
    from slimfx.compiler.cli import DEFAULT_CONFIG

    return DEFAULT_CONFIG
