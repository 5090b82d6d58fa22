"""The ``gpipe`` command: train, plan, generate, export and trace.

The only module (with :mod:`gpipe.cli.train`, :mod:`gpipe.cli.plan` and :mod:`gpipe.cli.base`)
that parses argv and prints. Each subcommand turns its options into calls of the library (:mod:`gpipe.train.loop`,
:mod:`gpipe.state`, :mod:`gpipe.planner.cost`, :mod:`gpipe.planner.simulate`, :mod:`gpipe.trace`) and
shows the results.

The invariant: :func:`main` returns an exit code and never lets a traceback escape for bad
input — a bad option value or type, a bad TOML file, a missing path, a damaged checkpoint or a
resume with a config that does not fit print one ``gpipe: error: ...`` line on stderr and
return 2, before training starts; and no command deletes or writes into a checkpoint it did
not replace (see :class:`gpipe.train.loop.Trainer` and :func:`gpipe.state.export`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpipe.cli.base import (
    Parser,
    UsageError,
    check_int,
    check_number,
    check_output_file,
    fmt_bytes,
)
from gpipe.cli.launch import EXIT_INTERRUPTED
from gpipe.cli.plan import add_plan_parser, cmd_plan
from gpipe.cli.train import add_train_parser, cmd_train, report_error

__all__ = ["UsageError", "build_parser", "main"]


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

    from gpipe import state as checkpoint
    from gpipe.models import TransformerConfig, TransformerLM

    ckpt = checkpoint.load(path, optimizer=False)
    resolved = ckpt.manifest.get("config", {}).get("model_resolved")
    model_fn = ckpt.manifest.get("config", {}).get("model_fn")
    if model_fn:
        raise checkpoint.CheckpointError(
            f"{ckpt.path} was trained with --model {model_fn}; this command needs a preset "
            "model (a run of gpipe train --model-preset ...)"
        )
    if not isinstance(resolved, dict):
        raise checkpoint.CheckpointError(
            f"{ckpt.path} records no model config; it was not written by gpipe train"
        )
    try:
        model = TransformerLM(TransformerConfig(**resolved))
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(
            f"{ckpt.path} records a model config that cannot be built ({e})"
        ) from None
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
    """Sample ``--tokens`` bytes after ``--prompt``; options are checked before loading."""
    from gpipe.state import CheckpointError

    check_int("--tokens", args.tokens, 0)
    check_number("--temperature", args.temperature, 0.0, " (0: greedy)")
    check_int("--top-k", args.top_k, 0)
    check_int("--seed", args.seed, -(2**63), 2**63 - 1)
    try:  # surrogate escapes stand for the raw (non-UTF-8) bytes the shell passed in
        prompt = args.prompt.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as e:
        raise UsageError(f"--prompt {args.prompt!r} cannot be encoded as bytes: {e}") from None
    try:
        model = load_model(args.checkpoint)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    out = sample_bytes(model, prompt, args.tokens, args.temperature, args.top_k, args.seed)
    print((prompt + out).decode("utf-8", errors="replace"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the checkpoint's model as one safetensors file, never inside the checkpoint."""
    from gpipe import state as checkpoint

    for above in Path(args.output).parents:
        if above.exists():
            if not above.is_dir():
                raise UsageError(
                    f"cannot write {args.output!r}: {str(above)!r} is a file, not a folder; "
                    "give a path in a folder"
                )
            break
    try:
        path = checkpoint.export(args.checkpoint, args.output)
    except ValueError as e:  # CheckpointError, or a target inside the checkpoint / a folder
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write {args.output!r}: {e.strerror or e}") from None
    print(f"wrote {path} ({fmt_bytes(path.stat().st_size)})")
    return 0


# ============================================================================ gpipe trace


_MAX_TRACE_DEVICES = 4096
"""More lanes than this is not a pipeline's timeline (one lane per device)."""


def cmd_trace(args: argparse.Namespace) -> int:
    """Re-plot a saved trace.json; a missing, unreadable or foreign file is a usage error."""
    from gpipe.trace import bubble_fraction, load_chrome_trace, plot_timeline

    path = Path(args.file)
    if not path.exists():
        raise UsageError(f"trace file {args.file!r} does not exist")
    if not path.is_file():
        raise UsageError(f"trace file {args.file!r} is not a file; pass a trace.json")
    png = args.png or str(path.with_suffix(".png"))
    if Path(png).resolve() == path.resolve():
        raise UsageError(f"--png {png!r} is the trace file itself; write the image elsewhere")
    check_output_file("--png", png)
    try:
        events = load_chrome_trace(path)
        unit = (json.loads(path.read_text()).get("otherData") or {}).get("gpipe_time_unit", "s")
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as e:
        raise UsageError(
            f"cannot read trace {args.file}: {type(e).__name__}: {e}; pass a trace.json "
            "written by gpipe (gpipe train --trace)"
        ) from None
    lanes = max(e.device for e in events) + 1
    if lanes > _MAX_TRACE_DEVICES:
        raise UsageError(
            f"trace {args.file} names device {lanes - 1}; gpipe plots at most "
            f"{_MAX_TRACE_DEVICES} devices (is the 'tid' of its events a device index?)"
        )
    try:
        plot_timeline(events, png, title=path.name, time_unit=unit)
    except OSError as e:
        raise UsageError(f"cannot write {png}: {e.strerror or e}") from None
    except (ValueError, TypeError, IndexError) as e:
        raise UsageError(f"cannot plot trace {args.file}: {e}") from None
    span = max(e.end for e in events) - min(e.start for e in events)
    print(
        f"{len(events)} actions on {lanes} devices, span "
        f"{span:.4g} {unit}, bubble {bubble_fraction(events):.1%}; timeline written to {png}"
    )
    return 0


# ============================================================================ main


def build_parser() -> argparse.ArgumentParser:
    """The ``gpipe`` argument parser with its subcommands."""
    parser = Parser(prog="gpipe", description="GPipe pipeline parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_train_parser(sub)
    add_plan_parser(sub)
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
    except SystemExit as e:  # --help printed
        return int(e.code or 0)
    except UsageError as e:  # argparse's own errors, made one line by Parser.error
        return report_error(str(e))
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
        return report_error(str(e))
    except KeyboardInterrupt:  # before gpipe train's own report (which names the checkpoint)
        print("gpipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
