"""The README's Python quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quick_start_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    quick = next(b for b in blocks if "gpipe.Pipe(" in b)
    scope: dict = {}
    exec(compile(quick, "README quick start", "exec"), scope)
    pipe = scope["pipe"]
    assert len(pipe.partitions) == 2
    assert all(p.grad is None for p in pipe.parameters())  # the example zeroes after stepping
    pipe.close()
