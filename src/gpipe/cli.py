"""The ``gpipe`` command: train, plan, generate, export and trace.

The only module that parses argv and prints. Each subcommand turns its options into calls of
the library (:mod:`gpipe.train`, :mod:`gpipe.checkpoint`, :mod:`gpipe.cost`,
:mod:`gpipe.simulate`, :mod:`gpipe.trace`) and shows the results.

The invariant: :func:`main` returns an exit code and never lets a traceback escape for bad
input — a missing path, a bad option, a damaged checkpoint or a resume with a config that does
not fit print one ``gpipe: error: ...`` line on stderr and return 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user; printed as one line, exit code 2."""


def _fail(message: str) -> int:
    print(f"gpipe: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ============================================================================ gpipe train

# (flag, TrainConfig field, type, help). Defaults live in TrainConfig; argparse defaults are
# None so that "given on the command line" can be told apart from "default".
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model-preset", "model_preset", str, "model size: tiny, small or 1b-words"),
    ("--stages", "stages", int, "pipeline stages K (worker threads, or processes with dist)"),
    ("--chunks", "chunks", int, "micro-batches M per mini-batch"),
    ("--schedule", "schedule", str, "gpipe, 1f1b, interleaved or zb-h1"),
    ("--remat", "remat", str, "re-materialization: always, except_last or never"),
    ("--batch-size", "batch_size", int, "sequences per optimizer step (split into chunks)"),
    ("--seq-len", "seq_len", int, "bytes per training sequence"),
    ("--steps", "steps", int, "optimizer steps in total"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup", "warmup", int, "linear warm-up steps, then cosine decay"),
    ("--final-lr-ratio", "final_lr_ratio", float, "learning rate at the end, relative to --lr"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--clip", "clip", float, "clip the global gradient norm to this (0: off)"),
    ("--precision", "precision", str, "fp32 or bf16 (autocast)"),
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


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train the byte-level Transformer LM as a pipeline",
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


def _read_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError(
                "--config needs Python >= 3.11 (tomllib) or the tomli package"
            ) from None

    from gpipe.train import TrainConfig

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path!r} does not exist")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    fields = {f for f in TrainConfig.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "model" and isinstance(value, dict):
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
    """Defaults < the resumed checkpoint's config < --config file < flags."""
    from gpipe import checkpoint
    from gpipe.train import TrainConfig

    values: dict[str, Any] = TrainConfig().to_dict()
    from_file = _read_toml(args.config) if args.config else {}
    flags = {field: getattr(args, field) for _, field, _, _ in _TRAIN_FLAGS}
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.resume:
        out = flags.get("out", from_file.get("out", values["out"]))
        found = checkpoint.latest(Path(out) / "checkpoints")
        if found is None:
            raise UsageError(
                f"nothing to resume: no checkpoint in {Path(out) / 'checkpoints'}; check --out, "
                "or run without --resume to start a fresh run"
            )
        _, manifest = checkpoint.read_manifest(found)
        saved = manifest.get("config", {})
        values.update({k: v for k, v in saved.items() if k in values and k != "out"})
    model = {**values["model"], **from_file.pop("model", {})}
    values.update(from_file)
    values.update(flags)
    if args.dropout is not None:
        model["dropout"] = args.dropout
    values["model"] = model
    if args.trace is not None:
        values["trace"] = args.trace
    return TrainConfig.from_dict(values)


def _launch_dist(config: Any, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with stages × data-parallel processes."""
    n = config.stages * config.data_parallel
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
        "-m", "gpipe.cli", *argv,
    ]  # fmt: skip
    print(f"gpipe: launching {n} processes: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def _init_dist() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class _Metrics:
    """metrics.jsonl (and TensorBoard when installed) for one run folder."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:  # drop the records of steps after the checkpoint (re-run after a crash)
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
            self.path.write_text("".join(kept))
        self.file = self.path.open("a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        row = {k: v for k, v in rec.items() if k != "events"}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{rec['kind']}/{key}", value, rec["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _write_trace(rec: dict[str, Any], out: Path) -> str:
    from gpipe.trace import plot_timeline, to_chrome_trace

    events, k = rec["events"], rec["num_devices"]
    to_chrome_trace(events, out / "trace.json", time_unit="s")
    plot_timeline(
        events,
        out / "timeline.png",
        title=f"gpipe train: step {rec['step']}",
        num_devices=k,
        time_unit="s",
    )
    return f"{out / 'trace.json'} and {out / 'timeline.png'}"


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from gpipe.checkpoint import CheckpointError, latest
    from gpipe.train import Trainer

    try:
        config = _train_config(args)
    except (ValueError, TypeError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    if config.runtime == "dist" and "LOCAL_RANK" not in os.environ:
        return _launch_dist(config, argv)
    if config.runtime == "dist":
        _init_dist()
    out = Path(config.out)
    t_setup = time.perf_counter()
    old = None if args.resume else latest(out / "checkpoints")
    try:
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    main_rank = trainer.is_main
    say = print if main_rank else (lambda *a, **k: None)
    metrics: _Metrics | None = None
    try:
        start = trainer.step
        if main_rank:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(
                json.dumps({**config.to_dict(), "model_resolved": _model_fields(trainer)}, indent=1)
                + "\n"
            )
        mc = trainer.model_config
        say(f"data: {trainer.corpus.description}")
        say(
            f"model: {config.model_preset} (d_model {mc.d_model}, {mc.n_layers} layers, "
            f"dropout {mc.dropout}), {trainer.model.num_parameters():,} parameters"
        )
        if hasattr(trainer.pipe, "partitions"):
            for part in trainer.pipe.partitions:
                say(f"  {part}")
        dp = config.data_parallel
        replicas = f" x {dp} data-parallel replicas" if dp > 1 else ""
        say(
            f"pipeline: {config.stages} stages{replicas}, {config.chunks} micro-batches of "
            f"{config.batch_size // (config.chunks * dp)}, schedule {config.schedule}, remat "
            f"{config.remat}, {config.precision}, runtime {config.runtime}"
        )
        if start:
            say(f"resumed from {trainer.resumed_from} at step {start}")
        elif old is not None:
            say(f"starting fresh: replaced the checkpoints in {old.parent} (--resume continues)")
        metrics = _Metrics(out, start if args.resume else None) if main_rank else None
        final = _train_loop(trainer, config, metrics, out, args.no_progress or not main_rank)
    except KeyboardInterrupt:
        say(
            f"\ninterrupted at step {trainer.step}; continue with: gpipe train --out {out} "
            "--resume",
            file=sys.stderr,
        )
        return 130
    except FloatingPointError as e:
        say(f"gpipe: error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
        if metrics is not None:
            metrics.close()
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


def _model_fields(trainer: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(trainer.model_config)


def _train_loop(
    trainer: Any, config: Any, metrics: _Metrics | None, out: Path, quiet: bool
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
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    tok_s=f"{rec['tokens_per_s']:.0f}",
                    bubble="-" if bub is None else f"{bub:.0%}",
                    refresh=False,
                )
                bar.update(1)
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
                log(f"step {rec['step']}: timeline written to {_write_trace(rec, out)}")
            elif kind == "checkpoint":
                log(f"step {rec['step']:>6}: checkpoint {rec['path']}")
    finally:
        bar.close()
    return final


# ============================================================================ gpipe plan


def _add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="cost table, partition and simulated schedules for a model (nothing allocated)",
        description="Profile a model on meta tensors, balance it into stages and simulate "
        "every schedule. The model is never allocated.",
    )
    p.add_argument("--model-preset", default="small", help="tiny, small or 1b-words")
    p.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function returning an nn.Sequential (built on the meta device)",
    )
    p.add_argument(
        "--input-shape",
        metavar="D1,D2,...",
        help="one sample's shape without the batch dim (with --model), e.g. 3,32,32",
    )
    p.add_argument(
        "--input-dtype",
        default="float32",
        help="dtype of the --model input (float32, long, ...)",
    )
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    p.add_argument("--schedule", default="gpipe", help="the schedule drawn by --png")
    p.add_argument("--png", metavar="FILE", help="draw the simulated timeline to FILE")


def _plan_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    micro = max(1, args.batch_size // args.chunks)
    if args.model:
        module_name, _, fn_name = args.model.partition(":")
        if not module_name or not fn_name:
            raise UsageError(f"--model must look like module:function, got {args.model!r}")
        sys.path.insert(0, os.getcwd())
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot load --model {args.model}: {e}") from None
        if not args.input_shape:
            raise UsageError("--model needs --input-shape (one sample, e.g. 3,32,32)")
        try:
            shape = [int(s) for s in args.input_shape.split(",") if s.strip()]
        except ValueError:
            raise UsageError(
                f"--input-shape must be integers like 3,32,32, got {args.input_shape!r}"
            ) from None
        dtype = getattr(torch, args.input_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"--input-dtype {args.input_dtype!r} is not a torch dtype")
        with torch.device("meta"):
            model = fn()
        if not isinstance(model, torch.nn.Sequential):
            raise UsageError(f"{args.model} returned a {type(model).__name__}, not nn.Sequential")
        sample = torch.zeros(micro, *shape, dtype=dtype, device="meta")
        return model, sample, args.model
    from gpipe.models import TransformerConfig, TransformerLM

    try:
        cfg = TransformerConfig.preset(args.model_preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seq = args.seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    with torch.device("meta"):
        model = TransformerLM(cfg)
    sample = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    label = (
        f"TransformerLM preset {args.model_preset} ({model.num_parameters() / 1e6:,.1f}M "
        f"parameters), micro-batch {micro} x {seq} tokens"
    )
    return model, sample, label


def cmd_plan(args: argparse.Namespace) -> int:
    from gpipe.balance import balance, stage_costs
    from gpipe.cost import profile, summarize
    from gpipe.schedules import available
    from gpipe.simulate import compare

    if args.stages < 1 or args.chunks < 1 or args.batch_size < 1:
        raise UsageError("--stages, --chunks and --batch-size must be positive")
    model, sample, label = _plan_model(args)
    costs = profile(model, sample)
    k, m = args.stages, args.chunks
    print(f"model: {label}")
    print(f"per-layer cost of one micro-batch ({len(costs)} layers):")
    print(summarize(costs))
    weights = [max(1, c.flops + c.backward_flops) for c in costs]
    try:
        counts = balance(weights, k)
    except ValueError as e:
        raise UsageError(str(e)) from None
    per_stage = stage_costs(weights, counts)
    imbalance = max(per_stage) / (sum(per_stage) / k)
    print(f"\npartition into {k} stages (balance {counts}), imbalance max/mean {imbalance:.3f}:")
    fwd = stage_costs([c.flops for c in costs], counts)
    bwd = stage_costs([c.backward_flops for c in costs], counts)
    in_bytes = sample.numel() * sample.element_size()
    boundary, start = [], 0
    for s, n in enumerate(counts):
        layers = costs[start : start + n]
        boundary.append(in_bytes if start == 0 else costs[start - 1].activation_bytes)
        print(
            f"  stage {s}: layers {layers[0].name}..{layers[-1].name} ({n}), "
            f"fwd {fwd[s] / 1e9:.3g} GFLOP, bwd {bwd[s] / 1e9:.3g} GFLOP, "
            f"params {_fmt_bytes(sum(c.param_bytes for c in layers))}, "
            f"input/micro-batch {_fmt_bytes(boundary[-1])}"
        )
        start += n
    unit = sum(fwd) / k or 1.0  # 1 cost unit = the mean stage's forward of one micro-batch
    fwd_u = [f / unit for f in fwd]
    bwd_u = [b / unit for b in bwd]
    print(
        f"\nsimulated schedules, K={k}, M={m} (1 unit = mean stage forward of one micro-batch; "
        f"no-bubble ideal {sum(f + b for f, b in zip(fwd_u, bwd_u)) / k * m:.1f} units):"
    )
    header = f"  {'schedule':<12} {'step (units)':>12} {'bubble':>7}   peak boundary activations"
    print(header + " per device (micro-batches, bytes)")
    chosen = None
    for name in available():
        try:
            ((_, res),) = compare([name], k, m, fwd_u, bwd_u)
        except ValueError as e:
            print(f"  {name:<12} n/a ({e})")
            continue
        peaks = ", ".join(
            f"{p} ({_fmt_bytes(p * boundary[d])})" for d, p in enumerate(res.peak_activations)
        )
        print(f"  {name:<12} {res.makespan:>12.1f} {res.bubble:>7.1%}   {peaks}")
        if name == args.schedule.lower().replace("_", "-"):
            chosen = res
    if args.png:
        if chosen is None:
            raise UsageError(f"--schedule {args.schedule!r} is not one of {available()}")
        from gpipe.trace import plot_timeline

        plot_timeline(
            chosen.events,
            args.png,
            title=f"{args.schedule}, K={k}, M={m} (simulated)",
            num_devices=k,
            time_unit="unit",
        )
        print(f"\ntimeline of {args.schedule} written to {args.png}")
    return 0


# ============================================================================ generate / export


def _add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run or checkpoint folder")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0)


def load_model(path: str) -> Any:
    """A plain TransformerLM with the weights of checkpoint ``path`` (eval mode)."""
    import torch

    from gpipe import checkpoint
    from gpipe.models import TransformerConfig, TransformerLM

    ckpt = checkpoint.load(path, optimizer=False)
    resolved = ckpt.manifest.get("config", {}).get("model_resolved")
    if not isinstance(resolved, dict):
        raise checkpoint.CheckpointError(
            f"{ckpt.path} records no model config; it was not written by gpipe train"
        )
    model = TransformerLM(TransformerConfig(**resolved))
    checkpoint.check_parameters(ckpt, model.state_dict())
    with torch.no_grad():
        model.load_state_dict(ckpt.state_dict)
    return model.eval()


def sample_bytes(
    model: Any, prompt: bytes, tokens: int, temperature: float, top_k: int, seed: int
) -> bytes:
    """Continue ``prompt`` by ``tokens`` bytes sampled from ``model``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt) or [ord("\n")]
    window = model.config.max_seq_len
    with torch.no_grad():
        for _ in range(tokens):
            x = torch.tensor([ids[-window:]], dtype=torch.long)
            logits = model(x)[0, -1].float()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            ids.append(nxt)
    return bytes(ids[len(prompt) or 1 :])


def cmd_generate(args: argparse.Namespace) -> int:
    from gpipe.checkpoint import CheckpointError

    if args.tokens < 0:
        raise UsageError("--tokens must be >= 0")
    try:
        model = load_model(args.checkpoint)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    prompt = args.prompt.encode("utf-8")
    out = sample_bytes(model, prompt, args.tokens, args.temperature, args.top_k, args.seed)
    print((prompt + out).decode("utf-8", errors="replace"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpipe import checkpoint

    try:
        path = checkpoint.export(args.checkpoint, args.output)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {path} ({_fmt_bytes(path.stat().st_size)})")
    return 0


# ============================================================================ gpipe trace


def cmd_trace(args: argparse.Namespace) -> int:
    from gpipe.trace import bubble_fraction, load_chrome_trace, plot_timeline

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"trace file {args.file!r} does not exist")
    try:
        events = load_chrome_trace(path)
        unit = (json.loads(path.read_text()).get("otherData") or {}).get("gpipe_time_unit", "s")
    except (ValueError, AttributeError) as e:
        raise UsageError(str(e)) from None
    png = args.png or str(path.with_suffix(".png"))
    plot_timeline(events, png, title=path.name, time_unit=unit)
    span = max(e.end for e in events) - min(e.start for e in events)
    print(
        f"{len(events)} actions on {max(e.device for e in events) + 1} devices, span "
        f"{span:.4g} {unit}, bubble {bubble_fraction(events):.1%}; timeline written to {png}"
    )
    return 0


# ============================================================================ main


def build_parser() -> argparse.ArgumentParser:
    """The ``gpipe`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="gpipe", description="GPipe pipeline parallelism for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train_parser(sub)
    _add_plan_parser(sub)
    _add_generate_parser(sub)
    p = sub.add_parser("export", help="write a checkpoint's model as one safetensors file")
    p.add_argument("checkpoint", metavar="DIR", help="run or checkpoint folder")
    p.add_argument("output", metavar="FILE.safetensors")
    p = sub.add_parser("trace", help="re-plot a saved trace.json")
    p.add_argument("file", metavar="FILE.json")
    p.add_argument("--png", metavar="FILE", help="output image (default: FILE with .png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gpipe`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "export":
            return cmd_export(args)
        return cmd_trace(args)
    except UsageError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
