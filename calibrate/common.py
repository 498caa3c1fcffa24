"""What the calibration commands share: their model / output / count arguments, the
calibration text (a file, or the model's own greedy text) and loading the model with it."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from slimfx.compiler.errors import UsageError


def add_common_arguments(p: argparse.ArgumentParser, counted: str) -> None:
    """--model, --out, --count / --fraction (of `counted`), --tokens, --text, --no-progress."""
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", "--output", dest="output", required=True, help="where to write the plan JSON")
    p.add_argument("--count", type=int, default=None, help=f"how many {counted}")
    p.add_argument("--fraction", type=float, default=None, help="instead of --count: this share of the layers, rounded")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--text", default=None, help="UTF-8 calibration text file (default: the model's own greedy text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_text_file(path: str | None) -> str | None:
    """The UTF-8 calibration text at `path` (None: none given); a one-line UsageError when
    it cannot be read."""
    from pathlib import Path

    from slimfx.compiler.errors import echo

    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"--text {echo(path)}: cannot be read ({why}); allowed: a readable UTF-8 text file") from None


def check_output(path: str) -> None:
    """A one-line UsageError now, not after minutes of calibration, when `path` cannot be written."""
    from pathlib import Path

    from slimfx.compiler.errors import echo

    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(out.name + ".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {echo(path)}: cannot be written ({exc.strerror or type(exc).__name__}); "
                         "allowed: a path in a writable folder") from None


def calibration_ids(model, tokenizer, tokens: int, text: str | None = None) -> torch.Tensor:
    """[1, T] token ids: `text` when given, else the model's own greedy continuation of a fixed prompt."""
    import torch

    if text is not None:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
        if ids.shape[1] < 16:
            raise UsageError(f"calibration text has {ids.shape[1]} tokens; give at least 16")
        return ids
    from slimfx.runtime.models import chat_input_ids

    prompt = chat_input_ids(tokenizer, "Write a detailed essay about the history of science, with examples.")
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max(1, tokens - prompt.shape[1]),
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, :tokens]


def load_for_calibration(args: argparse.Namespace, command: str):
    """(model, tokenizer, calibration ids [1, T]) after checking the shared arguments."""
    from slimfx.runtime.models import load_model

    if args.tokens < 16:
        raise UsageError(f"--tokens {args.tokens}: allowed: an integer >= 16")
    if (args.count is None) == (args.fraction is None):
        raise UsageError(f"calibrate {command}: give exactly one of --count or --fraction")
    text = read_text_file(args.text)
    check_output(args.output)
    model, tokenizer = load_model(args.model)
    return model, tokenizer, calibration_ids(model, tokenizer, args.tokens, text)


def model_name(args: argparse.Namespace) -> str:
    return args.model or "SmolLM2-135M-Instruct"


def text_name(args: argparse.Namespace) -> str:
    return args.text or "the model's own greedy text"


def attention_modules(model, command: str) -> list:
    """The self-attention modules in layer order (HF decoder layers' `self_attn`)."""
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise UsageError(f"calibrate {command}: no `self_attn` modules found; allowed: HF decoder-only models "
                         "(Llama, Qwen2, Mistral, Phi-3)")
    return modules


@contextmanager
def attention_weights(model, command: str, reduce):
    """While the body runs, every forward of `model` stores, per attention layer,
    `reduce(weights)` in the yielded list, weights being the first sequence's attention
    probabilities [Hq, T_query, T_key]. Attention runs eager meanwhile: the only HF
    implementation that returns its weights."""
    modules = attention_modules(model, command)
    values: list = [None] * len(modules)

    def hook_for(layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(f"calibrate {command}: attention weights not returned (eager attention required)")
            values[layer] = reduce(weights[0])
        return hook

    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield values
    finally:
        for h in handles:
            h.remove()
        model.config._attn_implementation = saved
