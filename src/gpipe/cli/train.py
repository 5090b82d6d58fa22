"""``gpipe train``: options, the torchrun relaunch for ``--runtime dist``, and the progress bar.

Options come from the defaults, then the resumed checkpoint's config, then ``--config
FILE.toml``, then flags, and are validated whole before anything is built. With ``--runtime
dist`` the command re-runs itself under torchrun (one process per stage and replica); each
process runs the same :class:`gpipe.train.loop.Trainer`, and rank 0 prints.

The invariant: a user error is one ``gpipe: error:`` line and exit code 2 under both runtimes.
Everything checkable from the options and the checkpoint's manifest is checked before torchrun
is launched (:func:`_train_config`; an option the run would ignore, or one ``--auto`` would
override, is refused); what a launched rank meets later (a diverged loss, a full disk at a
checkpoint) comes back through :mod:`gpipe.cli.launch` as the same one line. One run at a
time writes into an ``--out`` folder (:class:`gpipe.cli.run.RunLock`), and a Ctrl-C ends in
one line naming the last checkpoint and exit code 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpipe.cli.base import EXIT_USAGE, UsageError, check_folder_path, toml_module
from gpipe.cli.launch import (
    DIST_TIMEOUT,
    ERROR_DIR_ENV,
    EXIT_INTERRUPTED,
    init_dist,
    launch_dist,
    report_error,
    report_interrupted,
)
from gpipe.cli.plan_auto import add_train_auto_arguments, auto_train_config
from gpipe.cli.run import (
    LOCKED_ENV,
    EarlierRunFiles,
    Metrics,
    RunLock,
    interrupted_line,
    write_trace,
)

__all__ = ["add_train_parser", "cmd_train", "report_error"]

# (flag, TrainConfig field, type, help). Defaults live in TrainConfig; argparse defaults are
# None so that "given on the command line" can be told apart from "default".
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model-preset", "model_preset", str, "model size: tiny, small or 1b-words"),
    ("--model", "model_fn", str, "MODULE:FUNCTION returning a byte-level causal LM instead"),
    ("--stages", "stages", int, "pipeline stages K (worker threads, or processes with dist)"),
    ("--chunks", "chunks", int, "micro-batches M per mini-batch"),
    (
        "--schedule",
        "schedule",
        str,
        "gpipe, 1f1b, interleaved, interleaved-zb, zb-h1, zb-h2, zb-v or dualpipe-v",
    ),
    ("--virtual-stages", "virtual_stages", int, "stages per device V of interleaved(-zb)"),
    ("--remat", "remat", str, "re-materialization: always, except_last or never"),
    ("--batch-size", "batch_size", int, "sequences per optimizer step (split into chunks)"),
    ("--seq-len", "seq_len", int, "bytes per training sequence"),
    ("--steps", "steps", int, "optimizer steps in total"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup", "warmup", int, "linear warm-up steps, then cosine decay"),
    ("--final-lr-ratio", "final_lr_ratio", float, "learning rate at the end, relative to --lr"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--clip", "clip", float, "clip the global gradient norm to this (0: off)"),
    ("--precision", "precision", str, "fp32, bf16 (autocast) or fp16 (autocast, loss scale)"),
    ("--eval-interval", "eval_interval", int, "validate every N steps (0: only at the end)"),
    ("--eval-batches", "eval_batches", int, "fixed validation batches per evaluation"),
    ("--checkpoint-interval", "checkpoint_interval", int, "checkpoint every N steps (+ end)"),
    ("--keep", "keep", int, "checkpoints to keep"),
    ("--seed", "seed", int, "seed of initialization, batches and dropout"),
    ("--data", "data", str, "UTF-8 text file or folder (default: the Python stdlib sources)"),
    ("--max-bytes", "max_bytes", int, "cap on the training split in bytes"),
    ("--out", "out", str, "run folder: checkpoints, metrics.jsonl, config.json, trace"),
    ("--runtime", "runtime", str, "local (threads, one process) or dist (torchrun)"),
    ("--data-parallel", "data_parallel", int, "data-parallel replicas with --runtime dist"),
]


def add_train_parser(sub: Any) -> None:
    """Register ``gpipe train`` and its options on the subparsers ``sub``."""
    p = sub.add_parser(
        "train",
        help="train the byte-level Transformer LM (or --model's causal LM) as a pipeline",
        description="Train a byte-level Transformer LM with pipeline parallelism. Every option "
        "has a default; options come from the defaults, then --config FILE.toml, then flags.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="options as TOML ([model] overrides)")
    for flag, field, typ, text in _TRAIN_FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None, help=text)
    p.add_argument("--dropout", type=float, default=None, help="model dropout probability")
    p.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record one step's timeline to OUT/trace.json and OUT/timeline.png",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines)")
    add_train_auto_arguments(p)


def _read_toml(path: str) -> dict[str, Any]:
    """The options of TOML file ``path``, keys normalized to field names; a usage error for a
    missing, unreadable or invalid file or an unknown key (values are checked by
    :meth:`gpipe.train.loop.TrainConfig.validate`)."""
    from gpipe.train.loop import TrainConfig

    tomllib = toml_module()
    p = Path(path)
    if not p.exists():
        raise UsageError(f"config file {path!r} does not exist; check --config")
    if not p.is_file():
        raise UsageError(f"config file {path!r} is not a file; pass a .toml file to --config")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM some editors write
    except UnicodeDecodeError as e:
        msg = f"config file {path} is not UTF-8 text ({e.reason}); save it as UTF-8"
        raise UsageError(msg) from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    fields = {f for f in TrainConfig.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "model":
            if not isinstance(value, dict):
                raise UsageError(
                    f"config file {path}: model must be a [model] table of TransformerConfig "
                    f"fields, got {value!r}"
                )
            out["model"] = {k.replace("-", "_"): v for k, v in value.items()}
        elif name == "dropout":
            out.setdefault("model", {})["dropout"] = value
        elif name in fields:
            out[name] = value
        else:
            raise UsageError(
                f"config file {path}: unknown option {key!r}; known options: "
                f"{', '.join(sorted(fields))} and a [model] table"
            )
    return out


def _train_config(args: argparse.Namespace) -> Any:
    """Defaults < the resumed checkpoint's config < --config file < flags, validated whole
    (:meth:`gpipe.train.loop.TrainConfig.validate`) before anything is built."""
    from gpipe import state as checkpoint
    from gpipe.train.config import TrainConfig, check_resume

    values: dict[str, Any] = TrainConfig().to_dict()
    from_file = _read_toml(args.config) if args.config else {}
    flags = {field: getattr(args, field) for _, field, _, _ in _TRAIN_FLAGS}
    flags = {k: v for k, v in flags.items() if v is not None}
    out = flags.get("out", from_file.get("out", values["out"]))
    if not isinstance(out, str) or not out:
        raise UsageError(f"out must be a folder path, got {out!r} (--out)")
    check_folder_path("--out", out)
    check_folder_path("--out", str(Path(out) / "checkpoints"))
    resumed_step = found = None
    manifest: dict[str, Any] = {}
    if args.resume:
        found = checkpoint.latest(Path(out) / "checkpoints")
        if found is None:
            raise UsageError(
                f"nothing to resume: no checkpoint in {Path(out) / 'checkpoints'}; check --out, "
                "or run without --resume to start a fresh run"
            )
        _, manifest = checkpoint.read_manifest(found)
        saved = manifest.get("config", {})
        if not isinstance(saved, dict):
            raise UsageError(f"{found}/manifest.json records no training config to resume")
        values.update({k: v for k, v in saved.items() if k in values and k != "out"})
        resumed_step = manifest["step"]
    overrides = from_file.pop("model", {})
    model = {**values["model"], **overrides}
    values.update(from_file)
    values.update(flags)
    given = {**from_file, **flags}
    if values.get("model_fn") is not None:
        clash = [
            w
            for w, on in (
                ("--model-preset", "model_preset" in given),
                ("[model] overrides", bool(overrides)),
                ("--dropout", args.dropout is not None),
            )
            if on
        ]
        if clash:
            both = " and ".join(clash)
            raise UsageError(
                f"--model {values['model_fn']} builds its own model, so {both} (which configure "
                f"the preset TransformerLM) cannot be given with it; drop {both}"
            )
    if values["runtime"] == "local" and "runtime" in given and "data_parallel" not in given:
        values["data_parallel"] = 1  # a dist checkpoint's replicas, resumed in one process
    if args.dropout is not None:
        model["dropout"] = args.dropout
    values["model"] = model
    if args.trace is not None:
        values["trace"] = args.trace
    _check_auto(args, given, values.get("model_fn"))  # before the values' own checks
    config = TrainConfig.from_dict(values)
    if args.auto:  # printed once: by the command, not again by each torchrun rank
        config = auto_train_config(
            config, args.memory_limit, "LOCAL_RANK" not in os.environ, args.tune
        )
    if found is not None:  # before any process is launched: every rank would refuse alike
        check_resume(config, found, manifest)
    if resumed_step is not None and config.steps < resumed_step:
        raise UsageError(
            f"--steps {config.steps} is below the checkpoint's step {resumed_step} in "
            f"{Path(out) / 'checkpoints'}; pass --steps {resumed_step} or more to continue, or "
            "drop --resume (and pick another --out) to start fresh"
        )
    return config


_PLANNED = {
    "schedule": "--schedule",
    "chunks": "--chunks",
    "virtual_stages": "--virtual-stages",
    "remat": "--remat",
    "balance": "balance (--config)",
}
"""What ``--auto`` chooses: giving any of them too is refused, not silently overridden."""


def _check_auto(args: argparse.Namespace, given: dict[str, Any], model_fn: str | None) -> None:
    """``--memory-limit`` and ``--tune`` only with ``--auto``, and ``--auto`` without the
    options it chooses (given as flags or in ``--config``)."""
    if not args.auto:
        for flag, value, what in (
            ("--memory-limit", args.memory_limit, "is the limit the planner plans under"),
            ("--tune", args.tune, "times the planner's choices"),
        ):
            if value:
                raise UsageError(f"{flag} {value} {what}: add --auto, or drop {flag}")
        return
    clash = [flag for field, flag in _PLANNED.items() if field in given]
    if clash:
        both = " and ".join(clash)
        raise UsageError(
            f"--auto chooses the schedule, chunks, virtual stages, remat and balance, so {both} "
            f"cannot be given with it; drop {both}, or drop --auto to use them"
        )
    if model_fn is not None:
        raise UsageError(
            f"--auto plans the preset TransformerLM, not --model {model_fn}; drop "
            f"--auto and give --schedule and --chunks (gpipe plan --auto --model ... ranks them)"
        )


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Train as configured; every option is validated before the model is built, one run at a
    time writes into ``--out`` (:class:`gpipe.cli.run.RunLock`, held by this process, the
    ``--runtime dist`` launcher, or rank 0 of a run launched by torchrun directly), and an
    earlier run's checkpoints in ``--out`` are moved aside only after this run's first save."""
    from gpipe.state import CheckpointError

    try:
        config = _train_config(args)
    except (ValueError, TypeError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    launcher = config.runtime == "dist" and "LOCAL_RANK" not in os.environ
    holds = "LOCAL_RANK" not in os.environ or (
        LOCKED_ENV not in os.environ and os.environ.get("RANK", "0") == "0"
    )
    lock = RunLock(Path(config.out), " ".join(["gpipe", *argv])) if holds else None
    try:
        if launcher:
            return launch_dist(config, argv)
        return _train(args, config)
    finally:
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, config: Any) -> int:
    """Run the training ``config`` describes in this process (or rank), reporting as it goes;
    the exit code (130 when interrupted, naming the last checkpoint)."""
    from gpipe.state import CheckpointError, NoSpaceError, latest
    from gpipe.train.loop import Trainer

    if config.runtime == "dist":
        init_dist()
    out = Path(config.out)
    t_setup = time.perf_counter()
    old = None if args.resume else latest(out / "checkpoints")
    try:
        trainer = Trainer(config, resume=args.resume, timeout=DIST_TIMEOUT)
    except (ValueError, OSError, ModuleNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    main_rank = trainer.is_main
    say = print if main_rank else (lambda *a, **k: None)
    metrics: Metrics | None = None
    # An earlier run's metrics.jsonl and config.json: they follow its checkpoints aside, or
    # come back if this run stops before its first checkpoint.
    earlier = EarlierRunFiles(out) if trainer.replaces_earlier and main_rank else None
    try:
        start = trainer.step
        if main_rank:
            resolved = {**config.to_dict(), "model_resolved": _model_fields(trainer)}
            try:
                out.mkdir(parents=True, exist_ok=True)
                (out / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
            except OSError as e:
                raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
        mc = trainer.model_config
        say(f"data: {trainer.corpus.description}")
        if mc is None:  # --model: its layers, parameters counted once (parameters() dedups)
            n = sum(p.numel() for p in trainer.model.parameters())
            say(f"model: {config.model_fn} ({trainer.model.extra_repr()}), {n:,} parameters")
        else:
            say(
                f"model: {config.model_preset} (d_model {mc.d_model}, {mc.n_layers} layers, "
                f"dropout {mc.dropout}), {trainer.model.num_parameters():,} parameters"
            )
        for line in trainer.pipe.describe():
            say(f"  {line}")
        dp = config.data_parallel
        replicas = f" x {dp} data-parallel replicas" if dp > 1 else ""
        v = config.per_device()
        per = f" ({v} stages per device)" if v > 1 else ""
        say(
            f"pipeline: {config.stages} stages{replicas}, {config.chunks} micro-batches of "
            f"{config.batch_size // (config.chunks * dp)}, schedule {config.schedule}{per}, remat "
            f"{config.remat}, {config.precision}, runtime {config.runtime}"
        )
        if start:
            say(f"resumed from {trainer.resumed_from} at step {start}")
        elif old is not None:
            say(
                f"starting fresh: the earlier checkpoints in {old.parent} stay until this run "
                "saves its first one, then move aside (--resume would continue them)"
            )
        metrics = Metrics(out, start if args.resume else None) if main_rank else None
        quiet = args.no_progress or not main_rank
        final = _train_loop(trainer, config, metrics, out, quiet, earlier)
    except KeyboardInterrupt:
        first = earlier is not None and bool(earlier.saved)
        line = interrupted_line(out, trainer.step, before_first_save=first)
        return report_interrupted(line) if main_rank else EXIT_INTERRUPTED
    except (FloatingPointError, NoSpaceError, CheckpointError) as e:
        # the loss diverged (a learning rate or clip to change), or a save failed (the last
        # complete checkpoint is intact: free the space and resume)
        hint = (
            "" if isinstance(e, FloatingPointError) else f"; then: gpipe train --out {out} --resume"
        )
        return (
            report_error(f"{e}{hint}") if main_rank or ERROR_DIR_ENV in os.environ else EXIT_USAGE
        )
    finally:
        trainer.close()
        if metrics is not None:
            metrics.close()
        if earlier is not None:
            earlier.restore()  # nothing left to restore once they followed the checkpoints
    if final is not None:
        ent = trainer.unigram_entropy
        loss = final["val_loss"]
        verdict = "below" if loss < ent else "not yet below"
        say(
            f"final validation loss {loss:.3f} nats/byte (perplexity {final['val_ppl']:.2f}) vs "
            f"unigram byte entropy {ent:.3f} nats: {abs(ent - loss):.3f} nats {verdict} it"
        )
    say(f"done in {time.perf_counter() - t_setup:.0f}s; run folder {out}")
    return 0


def _model_fields(trainer: Any) -> dict[str, Any] | None:
    return trainer.model_fields()


def _train_loop(
    trainer: Any,
    config: Any,
    metrics: Metrics | None,
    out: Path,
    quiet: bool,
    earlier: EarlierRunFiles | None = None,
) -> dict[str, Any] | None:
    from tqdm import tqdm

    main_rank = trainer.is_main
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        unit="step",
        dynamic_ncols=True,
        disable=quiet,
        file=sys.stderr,
    )
    log = bar.write if not quiet else (print if main_rank else (lambda *a, **k: None))
    final = None
    last_log = time.perf_counter()
    try:
        for rec in trainer.run():
            kind = rec["kind"]
            if metrics is not None:
                metrics.write(rec)
            if kind == "step":
                bub = rec["bubble"]
                scale = {"scale": f"{rec['loss_scale']:g}"} if "loss_scale" in rec else {}
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    tok_s=f"{rec['tokens_per_s']:.0f}",
                    bubble="-" if bub is None else f"{bub:.0%}",
                    **scale,
                    refresh=False,
                )
                bar.update(1)
                if rec.get("skipped"):  # fp16: the gradients overflowed on some stage
                    log(
                        f"step {rec['step']:>6}: gradients not finite at loss scale "
                        f"{rec['loss_scale']:g}; step skipped on every stage, scale halved"
                    )
                if quiet and main_rank and time.perf_counter() - last_log > 10:
                    last_log = time.perf_counter()
                    log(
                        f"step {rec['step']}/{config.steps} loss {rec['loss']:.3f} "
                        f"{rec['tokens_per_s']:.0f} tok/s"
                    )
            elif kind == "eval":
                final = rec
                log(
                    f"step {rec['step']:>6}: validation loss {rec['val_loss']:.3f} "
                    f"(perplexity {rec['val_ppl']:.2f})"
                )
            elif kind == "trace" and main_rank:
                log(f"step {rec['step']}: timeline written to {write_trace(rec, out)}")
            elif kind == "checkpoint":
                log(f"step {rec['step']:>6}: checkpoint {rec['path']}")
                if rec.get("moved_aside"):
                    if earlier is not None:
                        earlier.follow(Path(rec["moved_aside"]))
                    log(
                        f"step {rec['step']:>6}: moved the earlier run's checkpoints (with its "
                        f"metrics.jsonl and config.json) to {rec['moved_aside']}; nothing deleted"
                    )
    finally:
        bar.close()
    return final
