"""``gpipe plan --auto``: the planner's ranking as a table, the top plans' timelines side by side.

The invariant: what is printed is :func:`gpipe.planner.autoplan.autoplan`'s ranking for the model and
options given, unchanged; a limit that nothing fits ends in one :class:`UsageError` carrying
the planner's own message.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from gpipe.cli.base import UsageError

__all__ = ["add_auto_arguments", "add_train_auto_arguments", "auto_train_config", "cmd_plan_auto"]


def add_auto_arguments(p: argparse.ArgumentParser) -> None:
    """``--auto`` and the options only it reads."""
    p.add_argument(
        "--auto",
        action="store_true",
        help="rank every configuration (schedule, V, M, balance, remat) by predicted step time",
    )
    p.add_argument(
        "--memory-limit", metavar="SIZE", help="per-device memory limit for --auto, e.g. 8GiB"
    )
    p.add_argument(
        "--optimizer",
        default=None,
        help="optimizer whose state --auto counts (adam, sgd, ...; default adam)",
    )
    p.add_argument("--top", type=int, default=None, help="rows of the --auto table (default 10)")


def cmd_plan_auto(args: argparse.Namespace, model: Any, sample: Any, label: str) -> int:
    """Print the ranking for ``model`` on ``sample`` (one whole batch); ``--png`` draws the
    simulated timelines of the top three side by side."""
    from gpipe.planner.autoplan import NoFitError, autoplan, table
    from gpipe.planner.memory_model import parse_bytes

    try:
        limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    except ValueError as e:
        raise UsageError(f"--memory-limit: {e}") from None
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    try:
        ranked = autoplan(
            model,
            sample,
            devices=args.stages,
            memory_limit=limit,
            optimizer=args.optimizer,
        )
    except NoFitError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"--auto: {e}") from None
    top = ranked[0]
    print(f"model: {label.split(', micro-batch')[0]}, batch {args.batch_size}, K={args.stages}")
    print(
        f"{len(ranked)} configurations, costs from {top.cost_source}, memory counts parameters, "
        f"gradients, {args.optimizer} state and live activations per device"
    )
    print(table(ranked, top=args.top))
    print(f"\nchosen: {top.describe()}")
    for d, mem in enumerate(top.memory):
        print(
            f"  device {d}: {_mib(mem.total)} = params {_mib(mem.parameters)} + grads "
            f"{_mib(mem.gradients)} + optimizer {_mib(mem.optimizer)} + activations "
            f"{_mib(mem.activations)} + remat inputs {_mib(mem.remat_inputs)} + transient "
            f"{_mib(mem.transient)}"
        )
    if args.png:
        _draw_side_by_side([c for c in ranked if c.fits][:3], args.png, args.stages)
        print(f"\ntimelines of the top plans written to {args.png}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _draw_side_by_side(configs: list, path: str, k: int) -> None:
    """Each configuration's simulated timeline drawn by ``trace.plot_timeline``, then the
    pictures put next to each other in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from gpipe.trace import plot_timeline

    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for c in configs:
            part = os.path.join(tmp, f"{c.rank}.png")
            plot_timeline(
                c.simulation.events,
                part,
                title=f"#{c.rank} {c.describe()}",
                num_devices=k,
            )
            images.append(imread(part))
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    for i, im in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(im)
        ax.axis("off")
    fig.subplots_adjust(left=0, right=1, top=1, bottom=0, wspace=0.01)
    try:
        FigureCanvasAgg(fig).print_png(path)
    except OSError as e:
        raise UsageError(f"cannot write --png {path}: {e.strerror or e}") from None


def add_train_auto_arguments(p: argparse.ArgumentParser) -> None:
    """``gpipe train --auto`` and its memory limit."""
    p.add_argument(
        "--auto",
        action="store_true",
        help="choose --schedule, --chunks and --remat with the planner (printed first)",
    )
    p.add_argument(
        "--memory-limit", metavar="SIZE", help="per-device memory limit for --auto, e.g. 8GiB"
    )
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="with --auto: time the planner's top N configurations for a few steps on this "
        "model and take the measured fastest (local runtime)",
    )


def auto_train_config(config: Any, memory_limit: str | None, say: bool, tune: int = 0) -> Any:
    """``config`` with the planner's top schedule, micro-batch count and remat mode for its
    model, batch and stages (AdamW's state counted; an interleaving schedule at the V the
    planner chose), and its balance. ``say``: print the ranking first. ``tune``: time the
    top ``tune`` that fit on a randomly initialized model of the config (same shapes, so the
    same speed) and take the measured fastest."""
    import dataclasses

    import torch

    from gpipe.models import TransformerLM
    from gpipe.planner.autoplan import NoFitError, autoplan, table
    from gpipe.planner.memory_model import parse_bytes
    from gpipe.schedules import interleaving

    try:
        limit = parse_bytes(memory_limit) if memory_limit else None
    except ValueError as e:
        raise UsageError(f"--memory-limit: {e}") from None
    with torch.device("meta"):
        model = TransformerLM(config.model_config())
    dp = config.data_parallel
    rows = config.batch_size // dp  # what one pipeline replica gets per step
    sample = torch.zeros(rows, config.seq_len, dtype=torch.long, device="meta")
    try:
        ranked = autoplan(
            model,
            sample,
            devices=config.stages,
            memory_limit=limit,
            optimizer="adamw",
        )
    except NoFitError as e:
        raise UsageError(str(e)) from None
    top = ranked[0]
    if say:
        print(f"planner (--auto): {len(ranked)} configurations, costs from {top.cost_source}")
        print(table(ranked, top=5))
    if tune:
        top = _tuned(config, ranked, tune, say)
    if say:
        print(f"training with: {top.describe()}\n")
    values = {
        "schedule": top.schedule,
        "virtual_stages": top.virtual_stages if top.schedule in interleaving() else None,
        "chunks": top.chunks,
        "remat": top.remat,
        "balance": [int(b) for b in top.balance],
    }
    chosen = dataclasses.replace(config, **values)
    chosen.validate()
    return chosen


def _tuned(config: Any, ranked: list, tune: int, say: bool) -> Any:
    """The measured fastest of ``ranked``'s top ``tune`` for ``config`` (its model at random
    weights, a random batch of its shape, its precision), printed as a table when ``say``."""
    import torch

    from gpipe.core.precision import Precision
    from gpipe.local.autotune import autotune, table
    from gpipe.models import TransformerLM, lm_loss

    if config.runtime != "local":
        raise UsageError(
            "--tune times configurations in this process, so it needs --runtime local; under "
            "--runtime dist each rank would time and choose on its own: tune locally, then pass "
            "the chosen --schedule/--chunks/--remat to the distributed run"
        )
    if tune < 1:
        raise UsageError(f"--tune must be >= 1, got {tune}")
    g = torch.Generator().manual_seed(config.seed)
    mc = config.model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TransformerLM(mc)
    shape = (config.batch_size, config.seq_len)
    x = torch.randint(0, mc.vocab_size, shape, generator=g)
    y = torch.randint(0, mc.vocab_size, shape, generator=g)
    with Precision(config.precision, "cpu").autocast():
        measured = autotune(model, ranked, x, y, lm_loss, top=tune)
    if say:
        print(f"\n--tune {tune}: measured on this machine (median step, 2 rounds)")
        print(table(measured))
    return measured[0].configuration
