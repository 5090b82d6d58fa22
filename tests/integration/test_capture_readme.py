"""The README's Hugging Face example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

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


@pytest.mark.slow
def test_the_hugging_face_training_example_learns(capsys) -> None:
    import importlib.util
    import math

    path = README.parent / "examples" / "hf_causal_lm.py"
    spec = importlib.util.spec_from_file_location("hf_causal_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    last = mod.main(["--steps", "12", "--max-bytes", "200000", "--batch", "8", "--seq", "32",
                     "--width", "32", "--lr", "1e-2"])  # fmt: skip
    out = capsys.readouterr().out
    first = float(out.split("step    0  loss ")[1].split()[0])
    assert math.isfinite(last) and last < first - 0.5  # it learns
    assert "lm_head" in out  # the partitions are printed
