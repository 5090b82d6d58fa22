"""Plain-text tables for the terminal: aligned columns, a dashed line under the head.

The invariant: every row has the head's number of cells, and each column is as wide as its
widest cell, so the planner's and the tuner's tables read alike.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``head`` and ``rows`` as left-aligned columns two spaces apart, a dashed rule below
    the head, trailing spaces trimmed."""
    widths = [max(len(r[j]) for r in (head, *rows)) for j in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
