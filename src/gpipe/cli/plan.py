"""``gpipe plan``: cost table, balanced partition and simulated schedules, nothing allocated.

The model (a preset, or the user's ``--model module:function``) is built on the meta device,
profiled, balanced into ``--stages`` and every schedule is simulated on those costs.

The invariant: every option is checked before the model is built, and whatever the user's
code does (fails to import, raises, returns something else, does not fit ``--input-shape``)
ends in one :class:`~gpipe.cli.base.UsageError` naming it — never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from gpipe.cli.base import UsageError, check_int, check_output_file, fmt_bytes, one_line
from gpipe.cli.plan_auto import add_auto_arguments, cmd_plan_auto

__all__ = ["add_plan_parser", "cmd_plan"]


def add_plan_parser(sub: Any) -> None:
    """Register ``gpipe plan`` and its options on the subparsers ``sub``."""
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
        help="a function returning an nn.Sequential, or any nn.Module and its example input "
        "(one micro-batch; captured and cut into layers); built on the meta device",
    )
    p.add_argument(
        "--input-shape",
        metavar="D1,D2,...",
        help="one sample's shape without the batch dim (with --model), e.g. 3,32,32",
    )
    p.add_argument(
        "--input-dtype",
        default=None,
        help="dtype of the --model input (float32, long, ...; default float32)",
    )
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--chunks", type=int, default=None, help=f"default {_DEFAULTS['chunks']}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    p.add_argument(
        "--schedule",
        default=None,
        help=f"the schedule drawn by --png (default {_DEFAULTS['schedule']})",
    )
    p.add_argument("--png", metavar="FILE", help="draw the simulated timeline to FILE")
    add_auto_arguments(p)


_DEFAULTS = {"chunks": 4, "schedule": "gpipe", "optimizer": "adam", "top": 10}
"""The defaults of the options that only one of the modes (with or without --auto) reads."""
_AUTO_ONLY = ("memory_limit", "optimizer", "top")
_FIXED_ONLY = ("chunks", "schedule")


def _check_auto_options(args: argparse.Namespace) -> None:
    """An option the chosen mode would ignore is refused (was: ignored without a word); then
    the defaults fill in."""
    unread = _FIXED_ONLY if args.auto else _AUTO_ONLY
    given = [f"--{n.replace('_', '-')}" for n in unread if getattr(args, n) is not None]
    if given and args.auto:
        flags = " and ".join(given)
        raise UsageError(
            f"--auto chooses the schedule and the chunks itself, so {flags} cannot be given "
            f"with it; drop {flags}, or drop --auto to use them"
        )
    if given:
        flags = " and ".join(given)
        verb = "shapes" if len(given) == 1 else "shape"
        raise UsageError(f"{flags} only {verb} the --auto ranking: add --auto, or drop {flags}")
    for name, value in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_args(args: argparse.Namespace) -> None:
    """Every option's type and range, before anything is imported or built."""
    from gpipe.schedules import available

    _check_auto_options(args)
    check_int("--stages", args.stages, 1)
    check_int("--chunks", args.chunks, 1)
    check_int("--batch-size", args.batch_size, 1)
    if args.batch_size % args.chunks and not args.auto:  # --auto chooses the chunks
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by --chunks {args.chunks}; "
            "choose chunks that divide the batch size"
        )
    if args.seq_len is not None:
        check_int("--seq-len", args.seq_len, 1)
    if args.schedule.lower().replace("_", "-") not in available():
        raise UsageError(f"--schedule {args.schedule!r} is not one of {available()}")
    if args.png:
        check_output_file("--png", args.png)
    if not args.model and (args.input_shape is not None or args.input_dtype is not None):
        raise UsageError(
            "--input-shape and --input-dtype describe the input of --model module:function; "
            "pass --model too, or drop them to plan --model-preset"
        )


def _input_shape(text: str | None) -> list[int]:
    if not text or not text.strip():
        raise UsageError("--model needs --input-shape (one sample, e.g. 3,32,32)")
    try:
        shape = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--input-shape must be integers like 3,32,32, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape needs positive sizes like 3,32,32, got {text!r}")
    return shape


def _user_model(args: argparse.Namespace, micro: int) -> tuple[Any, Any, str]:
    import torch

    module_name, _, fn_name = args.model.partition(":")
    if not module_name or not fn_name:
        raise UsageError(f"--model must look like module:function, got {args.model!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except Exception as e:  # the user's module: any failure is theirs to fix
        raise UsageError(f"cannot load --model {args.model}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise UsageError(
            f"--model {args.model} is not a function but the {type(fn).__name__} {fn!r:.60}"
        )
    try:
        with torch.device("meta"):
            model = fn()
    except Exception as e:
        raise UsageError(f"--model {args.model} raised {type(e).__name__}: {e}") from None
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], torch.nn.Module):
        return _captured(args, *model)
    if not isinstance(model, torch.nn.Sequential):
        raise UsageError(
            f"{args.model} returned a {type(model).__name__}, not an nn.Sequential nor a "
            "(model, example input) pair"
        )
    shape = _input_shape(args.input_shape)
    dtype = getattr(torch, args.input_dtype or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--input-dtype {args.input_dtype!r} is not a torch dtype")
    sample = torch.zeros(micro, *shape, dtype=dtype, device="meta")
    return model, sample, args.model


def _captured(args: argparse.Namespace, model: Any, example: Any) -> tuple[Any, Any, str]:
    """A ``(model, example input)`` from ``--model``: captured on the example (one
    micro-batch) and cut into layers, still on the meta device."""
    from gpipe.capture import capture, sample_args

    if args.input_shape is not None or args.input_dtype is not None:
        raise UsageError(
            f"{args.model} returned its own example input; drop --input-shape/--input-dtype"
        )
    try:
        a, kw = sample_args(example)
        layers = capture(model, example)
    except Exception as e:
        raise UsageError(f"cannot capture {args.model}: {one_line(e)[:600]}") from None
    n = sum(p.numel() for p in model.parameters())
    label = (
        f"{type(model).__name__} from {args.model} ({n / 1e6:,.1f}M parameters), captured "
        f"with {layers.method} into {len(layers)} layers"
    )
    return layers, layers.bind(a, kw), label


def _preset_model(args: argparse.Namespace, micro: int) -> tuple[Any, Any, str]:
    import torch

    from gpipe.models import TransformerConfig, TransformerLM

    try:
        cfg = TransformerConfig.preset(args.model_preset)
    except ValueError as e:
        raise UsageError(f"--model-preset: {e}") from None
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


def _shape(sample: Any) -> Any:
    if isinstance(sample, tuple):
        return [tuple(getattr(t, "shape", ())) for t in sample]
    return tuple(sample.shape)


@contextlib.contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """Silence torch's fake-tensor logger, which logs a full traceback before re-raising
    when a layer does not fit its input; the error itself is reported as one line."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the cost table, the partition and every schedule simulated; ``--png`` draws one."""
    from gpipe.planner.balance import balance, stage_costs
    from gpipe.planner.cost import profile, summarize
    from gpipe.planner.simulate import compare
    from gpipe.schedules import available

    _check_args(args)
    micro = args.batch_size if args.auto else args.batch_size // args.chunks
    build = _user_model if args.model else _preset_model
    model, sample, label = build(args, micro)
    if args.auto:  # the whole batch: the planner cuts it into micro-batches
        with _quiet_fake_tensors():
            return cmd_plan_auto(args, model, sample, label)
    try:
        with _quiet_fake_tensors():
            costs = profile(model, *(sample if isinstance(sample, tuple) else (sample,)))
    except Exception as e:  # the input does not fit the user's model
        raise UsageError(
            f"cannot run {label} on an input of shape {_shape(sample)} "
            f"({type(e).__name__}: {one_line(e)[:300]}); check --input-shape and --input-dtype"
        ) from None
    k, m = args.stages, args.chunks
    print(f"model: {label}")
    print(f"per-layer cost of one micro-batch ({len(costs)} layers):")
    print(summarize(costs))
    weights = [max(1, c.flops + c.backward_flops) for c in costs]
    try:
        counts = balance(weights, k)
    except ValueError as e:
        raise UsageError(f"--stages {k}: {e}") from None
    per_stage = stage_costs(weights, counts)
    imbalance = max(per_stage) / (sum(per_stage) / k)
    print(f"\npartition into {k} stages (balance {counts}), imbalance max/mean {imbalance:.3f}:")
    fwd = stage_costs([c.flops for c in costs], counts)
    bwd = stage_costs([c.backward_flops for c in costs], counts)
    in_bytes = sum(
        t.numel() * t.element_size()
        for t in (sample if isinstance(sample, tuple) else (sample,))
        if hasattr(t, "element_size")
    )
    boundary, start = [], 0
    for s, n in enumerate(counts):
        layers = costs[start : start + n]
        boundary.append(in_bytes if start == 0 else costs[start - 1].activation_bytes)
        print(
            f"  stage {s}: layers {layers[0].name}..{layers[-1].name} ({n}), "
            f"fwd {fwd[s] / 1e9:.3g} GFLOP, bwd {bwd[s] / 1e9:.3g} GFLOP, "
            f"params {fmt_bytes(sum(c.param_bytes for c in layers))}, "
            f"input/micro-batch {fmt_bytes(boundary[-1])}"
        )
        start += n
    unit = sum(fwd) / k or 1.0  # 1 cost unit = the mean stage's forward of one micro-batch
    fwd_u = [f / unit for f in fwd]
    bwd_u = [b / unit for b in bwd]
    print(
        f"\nsimulated schedules, K={k}, M={m} (1 unit = mean stage forward of one micro-batch; "
        f"no-bubble ideal {sum(f + b for f, b in zip(fwd_u, bwd_u)) / k * m:.1f} units):"
    )
    header = f"  {'schedule':<14} {'step (units)':>12} {'bubble':>7}   peak boundary activations"
    print(header + " per device (micro-batches, bytes)")
    chosen = None
    for name in available():
        try:
            ((_, res),) = compare([name], k, m, fwd_u, bwd_u)
        except ValueError as e:
            print(f"  {name:<14} n/a ({e})")
            continue
        peaks = ", ".join(
            f"{p} ({fmt_bytes(p * boundary[d])})" for d, p in enumerate(res.peak_activations)
        )
        print(f"  {name:<14} {res.makespan:>12.1f} {res.bubble:>7.1%}   {peaks}")
        if name == args.schedule.lower().replace("_", "-"):
            chosen = res
    if args.png:
        if chosen is None:
            raise UsageError(f"--schedule {args.schedule!r} cannot run with K={k}, M={m}")
        _draw(chosen, args, k, m)
    return 0


def _draw(result: Any, args: argparse.Namespace, k: int, m: int) -> None:
    from gpipe.trace import plot_timeline

    try:
        plot_timeline(
            result.events,
            args.png,
            title=f"{args.schedule}, K={k}, M={m} (simulated)",
            num_devices=k,
            time_unit="unit",
        )
    except OSError as e:
        raise UsageError(f"cannot write --png {args.png}: {e.strerror or e}") from None
    print(f"\ntimeline of {args.schedule} written to {args.png}")
