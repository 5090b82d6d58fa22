"""The options of a training run (:class:`TrainConfig`) and which of them a resume must keep.

The invariant: a :class:`TrainConfig` that exists is valid — every field is checked for type
and range when it is built (:meth:`TrainConfig.validate`), before a model or a process group is
created — and :data:`RESUME_KEYS` lists exactly the options that define a run's trajectory, so
:func:`resume_differences` refuses a resume that would silently train another run while
letting the topology (stages, runtime, schedule, data parallelism) change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpipe.core.precision import PRECISIONS
from gpipe.models import TransformerConfig
from gpipe.schedules import ScheduleSpec
from gpipe.schedules import available as available_schedules
from gpipe.stage.remat import MODES as REMAT_MODES
from gpipe.state import CheckpointError
from gpipe.train.data import DEFAULT_MAX_BYTES

__all__ = ["PRECISIONS", "RESUME_KEYS", "RUNTIMES", "TrainConfig", "resume_differences"]

RUNTIMES = ("local", "dist")


@dataclass
class TrainConfig:
    """Everything a training run depends on; every field has a default that trains well.

    ``model_fn`` (``module:function``, :mod:`gpipe.train.user_model`) trains that function's causal
    LM instead of the preset (no ``[model]`` overrides then).
    ``model`` overrides fields of the preset's :class:`TransformerConfig`; by default dropout
    is off (a few hundred steps over megabytes of text do not overfit, and dropout would only
    slow the loss down). ``batch_size`` is the mini-batch per optimizer step, split into
    ``chunks`` micro-batches. ``virtual_stages`` is V, the stages per device of an
    interleaving schedule (``None``: the schedule's own, 2 for interleaved). ``out`` receives
    ``checkpoints/`` (and, from the CLI, metrics and traces).
    """

    model_preset: str = "small"
    model: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0})
    model_fn: str | None = None
    stages: int = 2
    chunks: int = 4
    schedule: str = "gpipe"
    virtual_stages: int | None = None
    remat: str = "except_last"
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 300
    lr: float = 3e-3
    final_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    keep: int = 2
    seed: int = 0
    data: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    out: str = "runs/lm"
    trace: bool = False
    runtime: str = "local"
    data_parallel: int = 1
    balance: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value a run cannot use.

        Every field is checked for type and range here, once, before anything is built: a NaN
        ``clip`` or a ``chunks`` that does not divide ``batch_size`` is refused now, not found
        at step 1 (or when the first checkpoint's JSON refuses the NaN).
        """
        for name, low in _INT_FIELDS.items():
            _check_int(name, getattr(self, name), low)
        seed_ok = isinstance(self.seed, int) and not isinstance(self.seed, bool)
        if not seed_ok or not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits (|seed| < 2**63), got {self.seed!r}")
        for name, (low, high, open_low) in _FLOAT_FIELDS.items():
            _check_float(name, getattr(self, name), low, high, open_low, name in _OPEN_HIGH)
        for name, choices in (
            ("model_preset", tuple(TransformerConfig.PRESETS)),
            ("schedule", tuple(available_schedules())),
            ("remat", REMAT_MODES),
            ("precision", PRECISIONS),
            ("runtime", RUNTIMES),
        ):
            value = getattr(self, name)
            norm = value.lower().replace("_", "-") if isinstance(value, str) else value
            if norm not in [c.replace("_", "-") for c in choices]:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}, got {value!r} "
                    f"(--{name.replace('_', '-')})"
                )
        if self.virtual_stages is not None:
            _check_int("virtual_stages", self.virtual_stages, 1)
        try:
            self.per_device()
        except ValueError as e:
            raise ValueError(f"{e} (--virtual-stages, --schedule)") from None
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ValueError(
                f"data must be the path of a UTF-8 text file or folder, got {self.data!r}; "
                "leave it out for the bundled stdlib corpus"
            )
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a folder path, got {self.out!r} (--out)")
        if not isinstance(self.trace, bool):
            raise ValueError(f"trace must be true or false, got {self.trace!r} (--trace)")
        if self.data_parallel > 1 and self.runtime != "dist":
            raise ValueError(
                f"data_parallel={self.data_parallel} needs --runtime dist; the local runtime "
                "has one replica (use --data-parallel 1)"
            )
        if self.batch_size % (self.chunks * self.data_parallel):
            what = "chunks" if self.data_parallel == 1 else "chunks x data_parallel"
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by {what}="
                f"{self.chunks * self.data_parallel}; choose --chunks that divide --batch-size"
            )
        self._check_balance()
        if self.model_fn is not None:
            self._check_model_fn()
            return  # the user's model: its layers are known once it is captured
        mc = self.model_config()
        if self.seq_len > mc.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len={mc.max_seq_len}; "
                "lower --seq-len or raise max_seq_len in the [model] table"
            )
        n_layers = mc.n_layers + 2  # embedding, the blocks, head: TransformerLM's children
        virtual = self.per_device()
        if self.stages * virtual > n_layers:
            what = f"{self.stages} stages x {virtual} virtual stages" if virtual > 1 else "stages"
            raise ValueError(
                f"{what} = {self.stages * virtual} exceeds the model's {n_layers} layers "
                f"(embedding, {mc.n_layers} blocks, head); use --stages {n_layers // virtual} "
                "or fewer"
            )

    def per_device(self) -> int:
        """Stages per device: ``virtual_stages``, or the schedule's own (``ScheduleSpec``)."""
        return ScheduleSpec(self.schedule.lower(), self.virtual_stages).virtual_stages

    def _check_balance(self) -> None:
        """``balance`` (layers per stage, set by ``--auto``; ``None``: balanced by FLOPs) is a
        list of one positive count per (virtual) stage; the pipe checks it against the model."""
        if self.balance is None:
            return
        n = self.stages * self.per_device()
        ok = isinstance(self.balance, (list, tuple)) and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.balance
        )
        if not ok or len(self.balance) != n:
            raise ValueError(
                f"balance must list {n} positive layer counts (one per stage of {self.stages} "
                f"devices under {self.schedule}), got {self.balance!r}; leave it out to "
                "balance by FLOPs"
            )

    def _check_model_fn(self) -> None:
        from gpipe.train.user_model import check_spec

        check_spec(self.model_fn)
        if self.model not in ({}, {"dropout": 0.0}):
            raise ValueError(
                f"[model] overrides {sorted(self.model)} configure the preset TransformerLM; "
                f"--model {self.model_fn} builds its own model: drop them (or drop --model)"
            )

    def model_config(self) -> TransformerConfig:
        """The resolved model configuration (preset + overrides), each override type-checked
        (``TransformerConfig`` itself would take ``tie_embeddings="yes"`` as true)."""
        if not isinstance(self.model, dict):
            raise ValueError(
                f"model must be a table of TransformerConfig fields, got {self.model!r}"
            )
        kinds = {f.name: f.type for f in dataclasses.fields(TransformerConfig)}
        for key, value in self.model.items():
            kind = kinds.get(key)
            if kind is None:
                continue  # TransformerConfig.preset names the unknown field
            if kind in ("int", int):
                _check_int(f"model.{key}", value, 1)
            elif kind in ("float", float):  # the range is TransformerConfig's to check
                _check_float(f"model.{key}", value, -math.inf, math.inf, False)
            elif kind in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"model.{key} must be true or false, got {value!r}")
        return TransformerConfig.preset(self.model_preset, **self.model)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


_POSITIVE = ("stages", "chunks", "batch_size", "seq_len", "steps", "eval_batches", "max_bytes")
_OFF_AT_0 = ("warmup", "eval_interval", "checkpoint_interval")
_INT_FIELDS = {
    **dict.fromkeys((*_POSITIVE, "keep", "data_parallel"), 1),
    **dict.fromkeys(_OFF_AT_0, 0),
}
"""Integer fields and their smallest allowed value (0 for "0: off" options)."""

_FLOAT_FIELDS: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, True),
    "final_lr_ratio": (0.0, 1.0, False),
    "weight_decay": (0.0, math.inf, False),
    "clip": (0.0, math.inf, False),
    "beta1": (0.0, 1.0, False),
    "beta2": (0.0, 1.0, False),
    "eps": (0.0, math.inf, True),
}
"""Float fields: (low, high, low excluded); every value must also be finite."""
_OPEN_HIGH = ("beta1", "beta2")
"""Float fields whose high end is excluded (Adam's betas: a beta of 1 never forgets)."""


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        how = "" if "." in name else f"; pass --{name.replace('_', '-')} {low} or more"
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}{how}")


def _check_float(
    name: str, value: Any, low: float, high: float, open_low: bool, open_high: bool = False
) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        where = f" > {low:g}" if open_low else f" >= {low:g}"
        if math.isfinite(high):
            end = ")" if open_high else "]"
            where = f" in {'(' if open_low else '['}{low:g}, {high:g}{end}"
        elif not math.isfinite(low):
            where = ""
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")


RESUME_KEYS = (
    "chunks",
    "batch_size",
    "seq_len",
    "lr",
    "final_lr_ratio",
    "warmup",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "clip",
    "precision",
    "seed",
    "data",
    "max_bytes",
)
"""Options a resumed run must share with its checkpoint (they define the trajectory); the
resolved model configuration must match too. ``chunks`` counts as ``chunks x data_parallel``,
the micro-batches per step (each draws its own dropout stream).

``steps`` may grow (the cosine tail is re-shaped), and ``stages``, ``runtime``,
``data_parallel``, ``schedule``, ``remat``, evaluation, checkpoint and output options may
change (equal up to float rounding; bit for bit where the cut and the runtime are the same)."""


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The trajectory-defining differences between a checkpoint's recorded config ``saved``
    and ``config``, one phrase each (empty: the resume may go ahead)."""
    current = config.to_dict()
    out = []
    had_fn = saved.get("model_fn")
    if had_fn != config.model_fn:
        had, now = (repr(f) if f else "a preset TransformerLM" for f in (had_fn, config.model_fn))
        out.append(f"model_fn (checkpoint {had}, now {now})")
        return out
    resolved = saved.get("model_resolved")
    mine = None if config.model_fn else asdict(config.model_config())
    if mine is not None and isinstance(resolved, dict) and resolved != mine:
        keys = sorted(k for k, v in mine.items() if resolved.get(k) != v)
        out.append(f"model fields {keys}")
    for key in RESUME_KEYS:
        if key == "chunks" and key in saved:
            # Micro-batch i of the whole step draws stream i: what must match is the number of
            # micro-batches per step, chunks x data_parallel (local chunks=4 = dist 2 x 2).
            had_dp, dp = saved.get("data_parallel", 1), config.data_parallel
            had, now = saved["chunks"] * had_dp, config.chunks * dp
            if had != now and had_dp == dp == 1:
                out.append(f"chunks (checkpoint {saved['chunks']!r}, now {config.chunks!r})")
            elif had != now:
                out.append(
                    f"chunks x data_parallel, the micro-batches per step (checkpoint "
                    f"{saved['chunks']} x {had_dp} = {had}, now {config.chunks} x {dp} = {now})"
                )
        elif key in saved and saved[key] != current[key]:
            out.append(f"{key} (checkpoint {saved[key]!r}, now {current[key]!r})")
    return out


class ConfigMismatch(CheckpointError):
    """A resume whose config differs from the checkpoint's in a trajectory-defining key."""


def check_resume(config: TrainConfig, folder: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`ConfigMismatch` naming every trajectory-defining option in which
    ``config`` differs from the checkpoint's (``folder``, its ``manifest``)."""
    saved = manifest.get("config") or {}
    diffs = resume_differences(saved if isinstance(saved, dict) else {}, config)
    if diffs:
        raise ConfigMismatch(
            f"cannot resume from {folder}: the config differs in "
            + "; ".join(diffs)
            + ". Use the checkpoint's options (see its manifest.json or "
            f"{Path(config.out) / 'config.json'}) or start a fresh run without --resume"
        )
