"""The README's Hugging Face example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytest.importorskip("transformers")


def test_the_hugging_face_example_runs(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "sample=x" in b)
    scope: dict = {}
    exec(compile(block, "README Hugging Face example", "exec"), scope)
    out = capsys.readouterr().out
    assert "CausalLMOutputWithCrossAttentions" in out
    assert scope["loss"].item() > 0
    names = [n for p in scope["pipe"].partitions for n in p.layers]
    assert names[0] == "transformer/wte" and names[-1] == "lm_head"
