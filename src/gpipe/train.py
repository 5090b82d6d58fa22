"""The training loop behind ``gpipe train``: a byte-level Transformer LM trained as a pipeline.

:class:`Trainer` builds :class:`gpipe.models.TransformerLM` from a :class:`TrainConfig`, cuts it
into stages with :class:`gpipe.Pipe` (balanced by FLOPs from :mod:`gpipe.cost`), and trains it
with AdamW, linear warm-up then cosine decay, gradient clipping and optional bf16 autocast.
:meth:`Trainer.run` yields one metrics record per step, evaluation, trace and checkpoint; it
never prints — the CLI (or any caller) decides what to show.

The invariant: training is a pure function of the config. Batch ``s`` is
``get_batch(train, seed, step=s)``, the learning rate is a function of ``s``, dropout draws from
the pipe's keyed streams at ``Pipe.rng_step``; a checkpoint stores parameters, optimizer state,
step, ``rng_step`` and the torch RNG, so a run resumed from step ``N`` continues bit for bit
like the uninterrupted run (same machine, same thread count). Every config value is validated
(:meth:`TrainConfig.validate`) before anything is built, and no run deletes a checkpoint it
has not replaced with a newer one of its own (:class:`Trainer`).

Optimizer choice: AdamW with β1 0.9, β2 0.98, ε 1e-9. The seed used Adam β2 0.997 for
hundreds of thousands of steps; a run of a few hundred steps needs the second moment to adapt
faster (β2 0.98 averages over ~50 steps instead of ~330), and ε 1e-9 is kept. Weight decay
(0.01) applies to matrices only, not to biases, LayerNorm gains or the embedding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpipe import checkpoint as ckpt_mod
from gpipe.data import DEFAULT_MAX_BYTES, Corpus, get_batch, load_corpus, unigram_entropy
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from gpipe.remat import MODES as REMAT_MODES
from gpipe.schedules import available as available_schedules

__all__ = [
    "RESUME_KEYS",
    "ConfigMismatch",
    "TrainConfig",
    "Trainer",
    "learning_rate",
]

PRECISIONS = ("fp32", "bf16")
RUNTIMES = ("local", "dist")


@dataclass
class TrainConfig:
    """Everything a training run depends on; every field has a default that trains well.

    ``model`` overrides fields of the preset's :class:`TransformerConfig`; by default dropout
    is off (a few hundred steps over megabytes of text do not overfit, and dropout would only
    slow the loss down). ``batch_size`` is the mini-batch per optimizer step, split into
    ``chunks`` micro-batches. ``out`` receives ``checkpoints/`` (and, from the CLI, metrics
    and traces).
    """

    model_preset: str = "small"
    model: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0})
    stages: int = 2
    chunks: int = 4
    schedule: str = "gpipe"
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
            _check_float(name, getattr(self, name), low, high, open_low)
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
        mc = self.model_config()
        if self.seq_len > mc.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len={mc.max_seq_len}; "
                "lower --seq-len or raise max_seq_len in the [model] table"
            )
        n_layers = mc.n_layers + 2  # embedding, the blocks, head: TransformerLM's children
        virtual = 2 if self.schedule.lower() == "interleaved" else 1  # stages per device
        if self.stages * virtual > n_layers:
            what = f"{self.stages} stages x 2 virtual stages" if virtual > 1 else "stages"
            raise ValueError(
                f"{what} = {self.stages * virtual} exceeds the model's {n_layers} layers "
                f"(embedding, {mc.n_layers} blocks, head); use --stages {n_layers // virtual} "
                "or fewer"
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


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        how = "" if "." in name else f"; pass --{name.replace('_', '-')} {low} or more"
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}{how}")


def _check_float(name: str, value: Any, low: float, high: float, open_low: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and value <= high
    )
    if not ok:
        where = f" > {low:g}" if open_low else f" >= {low:g}"
        if math.isfinite(high):
            where = f" in ({low:g}, {high:g}]" if open_low else f" in [{low:g}, {high:g}]"
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
resolved model configuration must match too.

``steps`` may grow (the cosine tail is re-shaped), and ``stages``, ``schedule``, ``remat``,
evaluation, checkpoint and output options may change (equal up to float rounding)."""


class ConfigMismatch(ckpt_mod.CheckpointError):
    """A resume whose config differs from the checkpoint's in a trajectory-defining key."""


def learning_rate(step: int, *, lr: float, warmup: int, steps: int, final_ratio: float) -> float:
    """Learning rate of (0-based) step ``step``: linear warm-up over ``warmup`` steps to
    ``lr``, then cosine decay to ``lr * final_ratio`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in RESUME_KEYS:
        if key in saved and saved[key] != current[key]:
            out.append(f"{key} (checkpoint {saved[key]!r}, now {current[key]!r})")
    return out


class Trainer:
    """One training run: corpus, model, pipeline, optimizer, and the step counter.

    ``resume=True`` continues from the latest checkpoint under ``config.out/checkpoints``
    (raising :class:`gpipe.checkpoint.CheckpointError` if there is none or it does not fit);
    otherwise the run starts at step 0. An earlier run's checkpoints in that folder are never
    deleted: they stay in place until this run's first checkpoint is complete, and are then
    moved aside to ``checkpoints.old-<timestamp>`` (:attr:`moved_aside`), so a run that fails
    at setup or before its first save leaves them exactly as they were.
    """

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, corpus: Corpus | None = None
    ) -> None:
        self.config = config
        self.corpus = (
            corpus if corpus is not None else load_corpus(config.data, max_bytes=config.max_bytes)
        )
        need = config.seq_len + 1
        for split, tokens in (("train", self.corpus.train), ("validation", self.corpus.val)):
            if tokens.numel() < need:
                raise ValueError(
                    f"the {split} split of {config.data or 'the stdlib corpus'} has "
                    f"{tokens.numel()} bytes, fewer than seq_len + 1 = {need}; use a larger "
                    "corpus or a smaller --seq-len"
                )
        self.model_config = config.model_config()
        self.checkpoint_dir = Path(config.out) / "checkpoints"
        self.distributed = config.runtime == "dist"
        self.rank = 0
        torch.manual_seed(config.seed)
        self.model = TransformerLM(self.model_config)
        self.pipe = self._build_dist() if self.distributed else self._build_local()
        self.step = 0
        self.optimizer = self._build_optimizer()
        self._entropy: float | None = None
        self.moved_aside: Path | None = None
        # A fresh run over an earlier run's checkpoint folder: its first save moves that aside.
        self.replaces_earlier = False
        if resume:
            self.restore()
        else:
            d = self.checkpoint_dir
            self.replaces_earlier = self.can_checkpoint and d.is_dir() and any(d.iterdir())

    # ----------------------------------------------------------------- building

    def _balance(self) -> list[int]:
        """Layers per (virtual) stage, balanced by forward+backward FLOPs of one micro-batch
        (the interleaved schedule has two virtual stages per device)."""
        from gpipe.balance import balance
        from gpipe.cost import profile

        c = self.config
        n_stages = c.stages * (2 if c.schedule.lower() == "interleaved" else 1)
        micro = max(1, c.batch_size // (c.chunks * c.data_parallel))
        sample = torch.zeros(micro, c.seq_len, dtype=torch.long)
        costs = profile(self.model, sample)
        return balance([max(1, x.flops + x.backward_flops) for x in costs], n_stages)

    def _build_local(self) -> nn.Module:
        from gpipe.pipe import Pipe

        c = self.config
        self.balance = self._balance()
        return Pipe(
            self.model,
            balance=self.balance,
            chunks=c.chunks,
            schedule=c.schedule,
            remat=c.remat,
            seed=c.seed,
        )

    def _build_dist(self) -> nn.Module:
        from gpipe.distributed import DistributedPipe  # only the dist runtime needs it

        c = self.config
        self.balance = self._balance()
        pipe = DistributedPipe(
            self.model,
            stages=c.stages,
            balance=self.balance,
            chunks=c.chunks,
            schedule=c.schedule,
            remat=c.remat,
            seed=c.seed,
            data_parallel=c.data_parallel,
        )
        self.rank = int(getattr(pipe, "rank", 0))
        return pipe

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if self.distributed:
            params = [p for p in self.pipe.parameters() if p.requires_grad]
            self.param_names = [str(i) for i in range(len(params))]
            groups = [{"params": params, "weight_decay": c.weight_decay}]
        else:
            decay, no_decay, d_names, n_names = [], [], [], []
            emb = self.model[0].weight
            for name, p in self.model.named_parameters():
                if p.dim() >= 2 and p is not emb:
                    decay.append(p)
                    d_names.append(name)
                else:
                    no_decay.append(p)
                    n_names.append(name)
            self.param_names = d_names + n_names
            groups = [
                {"params": decay, "weight_decay": c.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
        self.parameters = [p for g in groups for p in g["params"]]
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)

    # ----------------------------------------------------------------- facts

    @property
    def is_main(self) -> bool:
        """True on the process that reports (rank 0, or the only process)."""
        return self.rank == 0

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training split's byte frequencies: the loss to beat."""
        if self._entropy is None:
            self._entropy = unigram_entropy(self.corpus.train, self.corpus.vocab_size)
        return self._entropy

    def lr_at(self, step: int) -> float:
        """The learning rate step ``step`` uses."""
        c = self.config
        return learning_rate(
            step, lr=c.lr, warmup=c.warmup, steps=c.steps, final_ratio=c.final_lr_ratio
        )

    def _devices(self) -> tuple[torch.device, torch.device]:
        """Where the inputs (first stage) and the targets (last stage) go."""
        devs = getattr(self.pipe, "devices", None)
        if devs:
            return devs[0], devs[-1]
        dev = torch.device(getattr(self.pipe, "device", "cpu"))
        return dev, dev

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(self._devices()[0].type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- steps

    def train_step(self) -> dict[str, Any]:
        """Run optimizer step ``self.step`` and advance; return its metrics."""
        c = self.config
        s = self.step
        first, last = self._devices()
        x, y = get_batch(self.corpus.train, c.batch_size, c.seq_len, seed=c.seed, step=s)
        x, y = x.to(first), y.to(last)
        lr = self.lr_at(s)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.pipe.train()
        t0 = time.perf_counter()
        with self._autocast():
            loss = self.pipe.step(x, y, lm_loss)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss became {loss_value} at step {s}; lower --lr (now {c.lr}) "
                "or --clip, or use --precision fp32"
            )
        if self.distributed:
            grad_norm = float(self.pipe.clip_grad_norm_(c.clip if c.clip > 0 else math.inf))
        else:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.parameters, c.clip if c.clip > 0 else math.inf)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.step = s + 1
        return {
            "kind": "step",
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": c.batch_size * c.seq_len / dt if dt > 0 else float("inf"),
            "bubble": self.measured_bubble(),
        }

    def measured_bubble(self) -> float | None:
        """Idle fraction of the last step's timeline (``None`` when no events were recorded,
        and with the distributed runtime, where a rank sees only its own device's events)."""
        events = getattr(self.pipe, "last_events", None)
        if not events or self.distributed:
            return None
        from gpipe.trace import bubble_fraction

        k = getattr(self.pipe, "num_devices", None)
        return float(bubble_fraction(events, k))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the fixed validation batches (dropout off); with perplexity."""
        c = self.config
        first, last = self._devices()
        self.pipe.eval()
        total = 0.0
        try:
            for i in range(c.eval_batches):
                # Negative steps: a fixed set, disjoint from the training draws' keys.
                x, y = get_batch(self.corpus.val, c.batch_size, c.seq_len, seed=c.seed, step=-1 - i)
                with self._autocast():
                    total += float(self.pipe.step(x.to(first), y.to(last), lm_loss))
        finally:
            self.pipe.train()
        val = total / c.eval_batches
        return {
            "kind": "eval",
            "step": self.step,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 700.0)),
        }

    def run(self) -> Iterator[dict[str, Any]]:
        """Train from ``self.step`` to ``config.steps``, yielding metrics records.

        Records are dicts with ``kind``: ``"eval"`` (at the start of a fresh run, every
        ``eval_interval`` steps and at the end), ``"step"`` (every step), ``"trace"`` (once,
        with ``events``, when ``config.trace``; local runtime), ``"checkpoint"`` (every
        ``checkpoint_interval`` steps and at the end, with ``path``).
        """
        c = self.config
        start = self.step
        evaluated: int | None = None  # step of the last evaluation
        saved: int | None = start if start else None  # step of the last checkpoint
        if start == 0 and c.eval_interval:
            evaluated = 0
            yield self.evaluate()
        tracing = c.trace and not self.distributed  # a rank sees only its own events
        trace_at = start + min(2, max(0, c.steps - start - 1)) if tracing else -1
        while self.step < c.steps:
            taken = self.step
            yield self.train_step()
            if taken == trace_at and getattr(self.pipe, "last_events", None):
                yield {
                    "kind": "trace",
                    "step": self.step,
                    "events": list(self.pipe.last_events),
                    "num_devices": getattr(self.pipe, "num_devices", c.stages),
                }
            if self.step == c.steps:
                break  # the final evaluation and checkpoint follow
            if c.eval_interval and self.step % c.eval_interval == 0:
                evaluated = self.step
                yield self.evaluate()
            due = c.checkpoint_interval and self.step % c.checkpoint_interval == 0
            if due and self.can_checkpoint:
                saved = self.step
                yield self._checkpoint_record()
        if evaluated != self.step:
            yield self.evaluate()
        if self.can_checkpoint and saved != self.step:
            yield self._checkpoint_record()

    def _checkpoint_record(self) -> dict[str, Any]:
        """Save, and say where the earlier run's checkpoints went if this save moved them."""
        moving = self.replaces_earlier
        rec: dict[str, Any] = {"kind": "checkpoint", "step": self.step, "path": str(self.save())}
        if moving:
            rec["moved_aside"] = str(self.moved_aside)
        return rec

    # ----------------------------------------------------------------- checkpoints

    @property
    def can_checkpoint(self) -> bool:
        """Checkpoints are written by the local runtime (the distributed one: not yet)."""
        return not self.distributed

    def stage_states(self) -> list[dict[str, torch.Tensor]]:
        """Each stage's tensors, named as in the full model's ``state_dict``."""
        children = dict(self.model.named_children())
        out = []
        for part in self.pipe.partitions:
            shard: dict[str, torch.Tensor] = {}
            for layer in part.layers:
                for k, v in children[layer].state_dict().items():
                    shard[f"{layer}.{k}"] = v
            out.append(shard)
        return out

    def save(self) -> Path:
        """Write a checkpoint of the current state under ``config.out/checkpoints``.

        The first save of a fresh run over an earlier run's folder goes to a staging folder
        first; only once it is complete is the earlier folder moved aside and the staging one
        renamed into its place (:func:`gpipe.checkpoint.replace_root`).
        """
        if not self.can_checkpoint:
            raise RuntimeError("checkpoints are not supported with --runtime dist yet")
        if not self.replaces_earlier:
            return self._save_to(self.checkpoint_dir)
        staging = ckpt_mod.staging_root(self.checkpoint_dir)
        try:
            path = self._save_to(staging)
        except BaseException:  # only this run's partial first checkpoint is in there
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.moved_aside = ckpt_mod.replace_root(self.checkpoint_dir, staging)
        self.replaces_earlier = False
        return self.checkpoint_dir / path.name

    def _save_to(self, root: Path) -> Path:
        tensors, meta = ckpt_mod.flatten_optimizer(self.optimizer.state_dict(), self.param_names)
        return ckpt_mod.save(
            root,
            self.step,
            self.stage_states(),
            optimizer=tensors,
            optimizer_meta=meta,
            config={**self.config.to_dict(), "model_resolved": asdict(self.model_config)},
            balance=self.balance,
            rng_state=torch.get_rng_state(),
            data={"seed": self.config.seed, "step": self.step},
            extra={"pipe_rng_step": int(self.pipe.rng_step)},
            keep=self.config.keep,
        )

    def restore(self) -> int:
        """Load the latest checkpoint; return the step it resumes from."""
        if not self.can_checkpoint:
            raise ValueError("--resume is not supported with --runtime dist yet")
        if ckpt_mod.latest(self.checkpoint_dir) is None:
            raise ckpt_mod.CheckpointError(
                f"nothing to resume: no checkpoint in {self.checkpoint_dir}; check --out, or "
                "run without --resume to start a fresh run"
            )
        ckpt = ckpt_mod.load(self.checkpoint_dir)
        saved = ckpt.manifest.get("config", {})
        current = self.config.to_dict()
        diffs = _differences(saved, current)
        resolved = saved.get("model_resolved")
        if resolved is not None and resolved != asdict(self.model_config):
            keys = sorted(k for k, v in asdict(self.model_config).items() if resolved.get(k) != v)
            diffs.insert(0, f"model fields {keys}")
        if diffs:
            raise ConfigMismatch(
                f"cannot resume from {ckpt.path}: the config differs in "
                + "; ".join(diffs)
                + ". Use the checkpoint's options (see its manifest.json or "
                f"{Path(self.config.out) / 'config.json'}) or start a fresh run without --resume"
            )
        ckpt_mod.check_parameters(ckpt, self.model.state_dict())
        with torch.no_grad():
            self.model.load_state_dict(ckpt.state_dict)
        meta = ckpt.manifest.get("optimizer")
        if meta is not None:
            self.optimizer.load_state_dict(
                ckpt_mod.unflatten_optimizer(ckpt.optimizer, meta, self.param_names)
            )
        rng = (ckpt.manifest.get("rng") or {}).get("torch_cpu")
        if rng is not None:
            torch.set_rng_state(ckpt_mod.decode_rng(rng))
        self.pipe.rng_step = int(ckpt.manifest.get("extra", {}).get("pipe_rng_step", ckpt.step))
        self.step = int(ckpt.manifest.get("data", {}).get("step", ckpt.step))
        self.resumed_from = ckpt.path
        return self.step

    def close(self) -> None:
        """Stop the pipeline's worker threads."""
        close = getattr(self.pipe, "close", None)
        if close is not None:
            close()
