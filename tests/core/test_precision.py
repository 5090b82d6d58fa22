"""fp16 training with a loss scale every stage agrees on (:mod:`gpipe.core.precision`).

The scale's rules (halve and skip on a non-finite norm, double after ``growth_interval``
finite steps, saved and restored), the trainer's use of them in one process, and the case a
per-process check would get wrong: an overflow on one rank's stage only, under the
distributed runtime — every rank must skip that step, so the stages stay one model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gpipe.core.precision import INIT_SCALE, Precision
from gpipe.train.data import load_corpus
from gpipe.train.loop import TrainConfig, Trainer
from runs import tiny as train_tiny
from spawn_ranks import run_gloo


def test_the_scale_halves_and_skips_on_overflow_and_grows_after_an_interval() -> None:
    p = Precision("fp16", "cpu", growth_interval=3)
    assert p.scale == INIT_SCALE
    assert p.update(math.inf) is False and p.scale == INIT_SCALE / 2
    assert p.update(math.nan) is False and p.scale == INIT_SCALE / 4
    assert [p.update(1.0) for _ in range(2)] == [True, True] and p.scale == INIT_SCALE / 4
    assert p.update(1.0) is True and p.scale == INIT_SCALE / 2  # 3 finite steps in a row
    saved = p.state_dict()
    q = Precision("fp16", "cpu", growth_interval=3)
    q.load_state_dict(saved)
    assert q.state_dict() == saved


def test_fp32_and_bf16_never_scale_or_skip() -> None:
    for name in ("fp32", "bf16"):
        p = Precision(name, "cpu")
        fn = p.loss_fn(lambda o, t: o.sum())
        assert fn(torch.ones(2), None).item() == 2.0
        assert p.update(math.inf) is True and p.scale == 1.0


def test_a_scale_that_cannot_get_finite_raises_with_the_way_out() -> None:
    p = Precision("fp16", "cpu")
    with pytest.raises(FloatingPointError, match="bf16 or fp32"):
        for _ in range(100):
            p.update(math.inf)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Precision("fp8", "cpu")


def tiny(out: Path, **kw) -> TrainConfig:
    """The trainer tests' tiny run (tests/train/test_loop.py), in fp16."""
    return train_tiny(
        out, **{"steps": 3, "warmup": 1, "eval_interval": 0, "precision": "fp16", **kw}
    )


def _params(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.pipe.named_parameters()}


def test_fp16_trains_and_resumes_with_its_scale(tmp_path: Path) -> None:
    corpus = load_corpus(max_bytes=60_000)
    t = Trainer(tiny(tmp_path / "a"), corpus=corpus)
    t.precision.scale = 2.0**40  # the first step's gradients overflow fp16
    before = _params(t)
    rec = t.train_step()
    assert rec["skipped"] and rec["loss_scale"] == 2.0**40
    assert t.precision.scale == 2.0**39
    assert all(torch.equal(before[n], v) for n, v in _params(t).items())  # nothing moved
    t.precision.scale = 1024.0
    recs = [t.train_step() for _ in range(2)]
    assert not any(r["skipped"] for r in recs)
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in recs)
    assert any(not torch.equal(before[n], v) for n, v in _params(t).items())
    t.save()
    t.close()
    resumed = Trainer(tiny(tmp_path / "a", steps=4), resume=True, corpus=corpus)
    assert resumed.precision.state_dict() == {"scale": 1024.0, "good_steps": 2}
    resumed.close()


def _overflow_on_one_rank(rank: int, path: Path) -> None:
    corpus = load_corpus(max_bytes=60_000)
    t = Trainer(tiny(path / "run", runtime="dist", steps=2), corpus=corpus)
    t.precision.scale = 1024.0
    hooks = []
    if rank == 1:  # the last stage's block gradients alone turn infinite, for one step (not
        # the tied head weight: its sum over copies would carry the overflow to rank 0)
        for name, p in t.pipe.named_parameters():
            if name.startswith("block"):
                hooks.append(p.register_hook(lambda g: g * math.inf))
        assert hooks
    before = _params(t)
    rec = t.train_step()
    moved = any(not torch.equal(before[n], v) for n, v in _params(t).items())
    for h in hooks:
        h.remove()
    rec2 = t.train_step()
    moved2 = any(not torch.equal(before[n], v) for n, v in _params(t).items())
    torch.save(
        (rec["skipped"], moved, t.precision.scale, rec2["skipped"], moved2),
        path / f"result{rank}.pt",
    )
    t.close()


@pytest.mark.slow  # spawns a gloo process group
@pytest.mark.timeout(150)
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    run_gloo(_overflow_on_one_rank, tmp_path, world=2, limit=120)
    for rank in range(2):
        skipped, moved, scale, skipped2, moved2 = torch.load(tmp_path / f"result{rank}.pt")
        assert skipped and not moved, (rank, skipped, moved)  # rank 0's stage was finite
        assert scale == 512.0, (rank, scale)
        assert not skipped2 and moved2, rank


def test_the_command_says_when_fp16_skipped_a_step(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    import gpipe.core.precision
    from gpipe.cli import main
    from runs import TINY

    monkeypatch.setattr(gpipe.core.precision, "INIT_SCALE", 2.0**40)  # the first steps overflow
    out = tmp_path / "run"
    args = ["train", *TINY, "--steps", "2", "--precision", "fp16", "--eval-interval", "0"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "step skipped on every stage, scale halved" in said, said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps[0]["skipped"] and steps[0]["loss_scale"] == 2.0**40
    assert steps[1]["loss_scale"] == 2.0**39
