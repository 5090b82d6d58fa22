"""The tiny training run the CLI, trainer and precision tests share: its ``gpipe train`` flags
(:data:`TINY`), the command that runs ``gpipe`` (:func:`gpipe_cmd`) and its
:class:`~gpipe.train.loop.TrainConfig` (:func:`tiny`)."""

from __future__ import annotations

import sys
from pathlib import Path

from gpipe.train.loop import TrainConfig

TINY = [
    "--model-preset",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--chunks",
    "2",
    "--eval-batches",
    "1",
    "--max-bytes",
    "100000",
]


def gpipe_cmd() -> list[str]:
    script = Path(sys.executable).parent / "gpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gpipe.cli"]


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(
        model_preset="tiny",
        model={"dropout": 0.1},  # dropout on: the keyed streams must resume too
        stages=2,
        chunks=2,
        batch_size=4,
        seq_len=16,
        steps=6,
        warmup=2,
        eval_interval=3,
        eval_batches=1,
        checkpoint_interval=3,
        out=str(out),
    )
    return TrainConfig(**{**base, **kw})
