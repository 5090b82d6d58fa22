"""``gpipe plan --model module:function`` where the function returns any module and its
example input: the model is captured on the meta device, cut and planned."""

from __future__ import annotations

import sys

import pytest

from gpipe.cli.main import main

pytest.importorskip("transformers")

MODULE = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2():
    cfg = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    assert model.transformer.wte.weight.is_meta  # gpipe plan builds under the meta device
    return model, torch.zeros(2, 16, dtype=torch.long)


def branchy():
    class B(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    return B(), torch.zeros(2, 3)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "capture_user_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "capture_user_models"
    sys.modules.pop("capture_user_models", None)


def test_plan_captures_and_cuts_any_module_on_meta(user_module, capsys) -> None:
    assert (
        main(
            [
                "plan",
                "--model",
                f"{user_module}:gpt2",
                "--stages",
                "2",
                "--chunks",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "captured with export into 9 layers" in out
    assert "transformer/h/0" in out and "partition into 2 stages" in out
    assert "1f1b" in out


def test_plan_reports_a_model_that_cannot_be_captured_in_one_line(user_module, capsys) -> None:
    assert main(["plan", "--model", f"{user_module}:branchy"]) != 0
    err = capsys.readouterr().err
    assert "cannot capture" in err and "torch.fx failed" in err
    assert "Traceback" not in err
