"""What lives across calls: KV stores, the attention op, the generation loops.

`slimfx.runtime.generate` is the fast loop (runtime/generate.py); the submodule stays
importable as `slimfx.runtime.generate` too (`from slimfx.runtime.generate import ...`).
"""

from slimfx.runtime.generate import generate  # noqa: F401  (the function shadows the submodule attribute on purpose)
