"""Plain-text tables for reports, `slimfx inspect` and plans.

A bottom-level helper: the anatomy, the pass report and the commands all print tables,
so this module imports nothing of slimfx.
"""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain monospace table (no third-party dependency)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])
