"""What the store needs to know to reproduce a model's attention exactly: which layers
attend only to a sliding window of recent positions, and how wide it is.

The generator gives each such layer's site a ring of at most `window` slots and the
`plain/<window>` layout (runtime/attention_op.Plain), so those layers read what the
model reads and hold no more than it can ever read.
"""

from __future__ import annotations


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


def site_windows(model) -> dict[int, int]:
    """{layer index: window} of the model's sliding-window layers (empty for none)."""
    config = getattr(model, "config", None)
    window, layers = sliding_window_layers(config) if config is not None else (None, [])
    return {layer: window for layer in layers}
