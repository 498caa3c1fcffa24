"""What the runtime's KV store cannot reproduce exactly, found before anything runs.

The store attends over every slot it holds (causal, full). A model whose attention
reads less than that gives different logits through the runtime than through its own
forward, so such a request is refused by name instead of answered wrongly.
"""

from __future__ import annotations

from slimfx.compiler.errors import UsageError


def sliding_window_layers(config) -> tuple[int | None, list[int]]:
    """(window, indices of the layers that attend only to the last `window` positions)
    from an HF config: per-layer `layer_types` where the model has them, else
    `sliding_window` (switched by `use_sliding_window` where that exists) on every layer."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, []
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window), [i for i, kind in enumerate(layer_types) if "sliding" in str(kind)]
    if not getattr(config, "use_sliding_window", True):
        return None, []
    return int(window), list(range(int(getattr(config, "num_hidden_layers", 0))))


def check_exact(model, total_tokens: int) -> None:
    """UsageError when generating `total_tokens` (padded prompt + new tokens) through the
    runtime would not give the model's own logits."""
    config = getattr(model, "config", None)
    if config is None:
        return
    window, layers = sliding_window_layers(config)
    if layers and total_tokens > window:
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        raise UsageError(
            f"model: layers {shown} use sliding-window attention (window {window}) and this request spans "
            f"{total_tokens} tokens; the slimfx runtime attends over the whole store and would not match the model; "
            f"allowed: prompt + new tokens <= {window}, or plain torch.compile(model, backend='slimfx') with model.generate"
        )
