"""The training loop behind ``gpipe train``: a byte-level Transformer LM trained as a pipeline.

:class:`Trainer` builds :class:`gpipe.models.TransformerLM` from a :class:`TrainConfig`, cuts it
into stages (balanced by FLOPs from :mod:`gpipe.planner.cost`) and trains it through a
:class:`gpipe.train.pipe.TrainerPipe` — threads in one process or one process per stage, the
trainer does not know which — with AdamW, linear warm-up then cosine decay, gradient clipping
and optional bf16 or fp16 autocast (fp16 with a loss scale all stages agree on:
:mod:`gpipe.core.precision`). :meth:`Trainer.run` yields one metrics record per step, evaluation,
trace and checkpoint; it never prints — the CLI (or any caller) decides what to show.

The invariant: training is a pure function of the config, not of the topology. Batch ``s`` is
``get_batch(train, seed, step=s)``, the learning rate is a function of ``s``, dropout draws from
the pipe's keyed streams at ``rng_step``; a checkpoint stores parameters and optimizer state by
parameter name, the step, ``rng_step`` and the torch RNG (:mod:`gpipe.train.state`), so a run
resumed from step ``N`` continues bit for bit like the uninterrupted run on the same cut and
runtime, and within float rounding on another. Under ``runtime="dist"`` every rank draws the
whole batch ``s`` (cheap: windows gathered from the corpus in memory) and the pipe keeps its
default ``batch="same"``, each data-parallel replica taking its share: the global batch, and
so the training, stays independent of ``--data-parallel`` and needs nothing but the step to
resume. Each step the ranks confirm they hold the same batch, mode and grad mode
(:mod:`gpipe.dist.call`). Every config value is validated
(:meth:`TrainConfig.validate`) before anything is built, and no run deletes a checkpoint it
has not replaced with a newer one of its own (:class:`Trainer`).

Optimizer choice: AdamW with β1 0.9, β2 0.98, ε 1e-9. The seed used Adam β2 0.997 for
hundreds of thousands of steps; a run of a few hundred steps needs the second moment to adapt
faster (β2 0.98 averages over ~50 steps instead of ~330), and ε 1e-9 is kept. Weight decay
(0.01) applies to matrices only, not to biases, LayerNorm gains or the embedding — decided by
parameter name and shape (:func:`decays`), so every runtime and every cut groups alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpipe import state as st
from gpipe.core.precision import Precision
from gpipe.models import TransformerLM, lm_loss
from gpipe.train.config import (
    PRECISIONS,
    RESUME_KEYS,
    RUNTIMES,
    ConfigMismatch,
    TrainConfig,
    check_resume,
)
from gpipe.train.data import Corpus, get_batch, load_corpus, unigram_entropy
from gpipe.train.pipe import TrainerPipe, build
from gpipe.train.state import restore_state, save_state
from gpipe.train.user_model import captured_user_model, embedding_weights, user_lm_loss

__all__ = [
    "PRECISIONS",
    "RESUME_KEYS",
    "RUNTIMES",
    "ConfigMismatch",
    "TrainConfig",
    "Trainer",
    "decays",
    "learning_rate",
]


def learning_rate(step: int, *, lr: float, warmup: int, steps: int, final_ratio: float) -> float:
    """Learning rate of (0-based) step ``step``: linear warm-up over ``warmup`` steps to
    ``lr``, then cosine decay to ``lr * final_ratio`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def decays(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters weight decay
    applies to: matrices, except token embeddings (and heads tied to them) — the first layer's
    weight of a sequence, and every ``nn.Embedding``'s weight."""
    emb = embedding_weights(model)
    if isinstance(model, nn.Sequential) and len(model):
        emb.add(id(getattr(model[0], "weight", None)))
    return {n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in emb}


class Trainer:
    """One training run: corpus, model, pipeline, optimizer, and the step counter.

    ``resume=True`` continues from the latest checkpoint under ``config.out/checkpoints``
    (raising :class:`gpipe.state.CheckpointError` if there is none or it does not fit),
    whatever topology wrote it; otherwise the run starts at step 0. An earlier run's
    checkpoints in that folder are never deleted: they stay in place until this run's first
    checkpoint is complete, and are then moved aside to ``checkpoints.old-<timestamp>``
    (:attr:`moved_aside`), so a run that fails at setup or before its first save leaves them
    exactly as they were. Under ``runtime="dist"`` every rank constructs a Trainer and runs
    it identically (after ``torch.distributed.init_process_group``).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        corpus: Corpus | None = None,
        timeout: float = 300.0,
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
        self.model_config = None if config.model_fn else config.model_config()
        self.checkpoint_dir = Path(config.out) / "checkpoints"
        torch.manual_seed(config.seed)
        self.model, self._decay, sample = self._build_model()
        self.model_shapes = {n: tuple(t.shape) for n, t in self.model.state_dict().items()}
        self._loss = user_lm_loss if config.model_fn else lm_loss
        self.balance = list(config.balance) if config.balance else self._balance(sample)
        self.pipe: TrainerPipe = build(config, self.model, self.balance, timeout=timeout)
        self.step = 0
        self.optimizer = self._build_optimizer()
        self.precision = Precision(config.precision, self.pipe.devices()[0].type)
        self._entropy: float | None = None
        self.moved_aside: Path | None = None
        self.resumed_from: Path | None = None
        self.last_timeline: list[Any] = []
        # A fresh run over an earlier run's checkpoint folder: its first save moves that aside.
        self.replaces_earlier = False
        if resume:
            self.restore()
        else:
            d = self.checkpoint_dir
            self.replaces_earlier = bool(
                self.pipe.broadcast(d.is_dir() and any(d.iterdir()) if self.is_main else None)
            )

    # ----------------------------------------------------------------- building

    def _build_model(self) -> tuple[nn.Module, set[str], tuple]:
        """The model the pipe cuts (``TransformerLM``, or ``--model``'s module captured into
        layers), the names weight decay applies to, and one micro-batch's flat inputs."""
        c = self.config
        micro = max(1, c.batch_size // (c.chunks * c.data_parallel))
        if self.model_config is not None:
            model = TransformerLM(self.model_config)
            return model, decays(model), (torch.zeros(micro, c.seq_len, dtype=torch.long),)
        layers, module, sample = captured_user_model(str(c.model_fn), c.seq_len, micro)
        return layers, decays(module), sample

    def _balance(self, sample: tuple) -> list[int]:
        """Layers per (virtual) stage, balanced by forward+backward FLOPs of one micro-batch
        (V of them per device: ``TrainConfig.per_device``)."""
        from gpipe.planner.balance import balance
        from gpipe.planner.cost import profile

        c = self.config
        n_stages = c.stages * c.per_device()
        costs = profile(self.model, *sample)
        return balance([max(1, x.flops + x.backward_flops) for x in costs], n_stages)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over this process's parameters: matrices decayed, the rest not (by name)."""
        c = self.config
        named = [(n, p) for n, p in self.pipe.named_parameters() if p.requires_grad]
        decay = [(n, p) for n, p in named if n in self._decay]
        rest = [(n, p) for n, p in named if n not in self._decay]
        self.param_names = [n for n, _ in decay + rest]
        self.parameters = [p for _, p in decay + rest]
        groups = [
            {"params": [p for _, p in decay], "weight_decay": c.weight_decay},
            {"params": [p for _, p in rest], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)

    # ----------------------------------------------------------------- facts

    @property
    def rank(self) -> int:
        """This process's rank (0 in one process)."""
        return self.pipe.rank

    @property
    def is_main(self) -> bool:
        """True on the process that reports (rank 0, or the only process)."""
        return self.pipe.is_main

    @property
    def can_checkpoint(self) -> bool:
        """Both runtimes write checkpoints (kept for callers of the earlier API)."""
        return True

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training split's byte frequencies: the loss to beat."""
        if self._entropy is None:
            self._entropy = unigram_entropy(self.corpus.train, self.corpus.vocab_size)
        return self._entropy

    def model_fields(self) -> dict[str, Any] | None:
        """The resolved ``TransformerConfig`` fields (``None`` for a ``--model`` run)."""
        return None if self.model_config is None else asdict(self.model_config)

    def lr_at(self, step: int) -> float:
        """The learning rate step ``step`` uses."""
        c = self.config
        return learning_rate(
            step, lr=c.lr, warmup=c.warmup, steps=c.steps, final_ratio=c.final_lr_ratio
        )

    # ----------------------------------------------------------------- steps

    def train_step(self) -> dict[str, Any]:
        """Run optimizer step ``self.step`` and advance; return its metrics."""
        c = self.config
        s = self.step
        first, last = self.pipe.devices()
        x, y = get_batch(self.corpus.train, c.batch_size, c.seq_len, seed=c.seed, step=s)
        x, y = x.to(first), y.to(last)
        lr = self.lr_at(s)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.pipe.train()
        t0 = time.perf_counter()
        prec = self.precision
        scale = prec.scale
        with prec.autocast():
            loss = self.pipe.step(x, y, prec.loss_fn(self._loss))
        loss_value = prec.loss_value(loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss became {loss_value} at step {s}; lower --lr (now {c.lr}) "
                "or --clip, or use --precision fp32"
            )
        prec.unscale(p for _, p in self.pipe.named_parameters())
        grad_norm = self.pipe.clip_grad_norm_(c.clip if c.clip > 0 else math.inf)
        stepped = prec.update(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.step = s + 1
        self.last_timeline = self.pipe.timeline()
        return {
            "kind": "step",
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": c.batch_size * c.seq_len / dt if dt > 0 else float("inf"),
            "bubble": self.measured_bubble(),
            **({"loss_scale": scale, "skipped": not stepped} if prec.scaled else {}),
        }

    def measured_bubble(self) -> float | None:
        """Idle fraction of the last step's timeline over every device of the job (``None``
        when no events were recorded)."""
        if not self.last_timeline:
            return None
        from gpipe.trace import bubble_fraction

        return float(bubble_fraction(self.last_timeline, self.pipe.num_lanes))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the fixed validation batches (dropout off); with perplexity."""
        c = self.config
        first, last = self.pipe.devices()
        self.pipe.eval()
        total = 0.0
        try:
            for i in range(c.eval_batches):
                # Negative steps: a fixed set, disjoint from the training draws' keys.
                x, y = get_batch(self.corpus.val, c.batch_size, c.seq_len, seed=c.seed, step=-1 - i)
                with self.precision.autocast():
                    total += float(self.pipe.step(x.to(first), y.to(last), self._loss))
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
        with ``events`` of every device on one clock, when ``config.trace``), ``"checkpoint"``
        (every ``checkpoint_interval`` steps and at the end, with ``path``). Every process of
        a distributed run yields the same records.
        """
        c = self.config
        start = self.step
        evaluated: int | None = None  # step of the last evaluation
        saved: int | None = start if start else None  # step of the last checkpoint
        if start == 0 and c.eval_interval:
            evaluated = 0
            yield self.evaluate()
        trace_at = start + min(2, max(0, c.steps - start - 1)) if c.trace else -1
        while self.step < c.steps:
            taken = self.step
            yield self.train_step()
            if taken == trace_at and self.last_timeline:
                yield {
                    "kind": "trace",
                    "step": self.step,
                    "events": list(self.last_timeline),
                    "num_devices": self.pipe.num_lanes,
                    "lanes": self.pipe.lane_names(),
                }
            if self.step == c.steps:
                break  # the final evaluation and checkpoint follow
            if c.eval_interval and self.step % c.eval_interval == 0:
                evaluated = self.step
                yield self.evaluate()
            if c.checkpoint_interval and self.step % c.checkpoint_interval == 0:
                saved = self.step
                yield self._checkpoint_record()
        if evaluated != self.step:
            yield self.evaluate()
        if saved != self.step:
            yield self._checkpoint_record()

    def _checkpoint_record(self) -> dict[str, Any]:
        """Save, and say where the earlier run's checkpoints went if this save moved them."""
        moving = self.replaces_earlier
        rec: dict[str, Any] = {"kind": "checkpoint", "step": self.step, "path": str(self.save())}
        if moving:
            rec["moved_aside"] = str(self.moved_aside)
        return rec

    # ----------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write a checkpoint of the current state under ``config.out/checkpoints`` (every
        process of a distributed run calls it; each writes its own shards).

        The first save of a fresh run over an earlier run's folder goes to a staging folder
        first; only once it is complete is the earlier folder moved aside and the staging one
        renamed into its place (:func:`gpipe.state.replace_root`).
        """
        path, aside = save_state(
            self.pipe,
            self.checkpoint_dir,
            self.step,
            self.optimizer,
            self.param_names,
            staging=self.replaces_earlier,
            config={**self.config.to_dict(), "model_resolved": self.model_fields()},
            data={"seed": self.config.seed, "step": self.step},
            extra={"pipe_rng_step": self.pipe.rng_step, "loss_scale": self.precision.state_dict()},
            keep=self.config.keep,
        )
        if self.replaces_earlier:
            self.moved_aside = aside
            self.replaces_earlier = False
        return path

    def restore(self) -> int:
        """Load the latest checkpoint (of any topology); return the step it resumes from."""
        found = self.pipe.broadcast(
            None if not self.is_main else str(st.latest(self.checkpoint_dir) or "")
        )
        if not found:
            raise st.CheckpointError(
                f"nothing to resume: no checkpoint in {self.checkpoint_dir}; check --out, or "
                "run without --resume to start a fresh run"
            )
        ckpt = restore_state(
            self.pipe,
            Path(found),
            self.optimizer,
            self.param_names,
            self.model_shapes,
            lambda folder, manifest: check_resume(self.config, folder, manifest),
        )
        self.step = int(ckpt.manifest.get("data", {}).get("step", ckpt.step))
        self.precision.load_state_dict(ckpt.manifest.get("extra", {}).get("loss_scale"))
        self.resumed_from = ckpt.path
        return self.step

    def close(self) -> None:
        """Stop the pipeline's workers (and, distributed, release its groups)."""
        self.pipe.close()
