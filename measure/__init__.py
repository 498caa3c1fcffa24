"""Measurement: what a configuration costs in quality (`slimfx eval`) and buys in speed
(`slimfx bench`). Metrics take any HF-style causal LM (a callable returning `.logits`)
and its tokenizer, so they work on the unmodified and the compiled model alike.

Kept import-light (no torch here) so the CLI starts fast.
"""

from slimfx.measure.errors import UsageError

__all__ = ["UsageError"]
