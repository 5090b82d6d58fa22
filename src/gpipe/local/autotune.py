"""The planner's top configurations timed for real: the measured fastest is the choice.

:func:`gpipe.planner.autoplan.autoplan` ranks every configuration by a model of its step time; on a
real machine that model is off by a few percent to tens of percent (per-action overheads,
two workers slowing each other, a split backward's extra memory traffic), and the top few
are often that close. :func:`autotune` builds a :class:`gpipe.Pipe` for each of the top
``n`` configurations that fit, on the user's own model and batch, times ``steps`` training
steps of each — in rounds, each round in the opposite order to the last, so a machine that
speeds up or slows down meanwhile favours none — and ranks them by their median.

The invariant: tuning leaves no trace on the model. Every parameter's ``.grad``, every buffer
(BatchNorm statistics), the module's training mode and the global random state are what they
were before, so the first real step after it computes exactly the gradients it would have
without tuning (``tests/local/test_autotune.py``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpipe.base.texttable import text_table
from gpipe.core.reduction import Reduction
from gpipe.planner.autoplan import Configuration

__all__ = ["Measured", "autotune", "median_time", "preserved", "table"]


@dataclass(frozen=True)
class Measured:
    """One configuration's measured step: ``times`` each round's median step (seconds),
    ``step_time`` their median; the planner's prediction is ``configuration.step_time``."""

    configuration: Configuration
    step_time: float
    times: tuple[float, ...]

    @property
    def error(self) -> float:
        """The planner's relative error for this configuration (predicted / measured − 1)."""
        return self.configuration.step_time / self.step_time - 1


@contextlib.contextmanager
def preserved(module: nn.Module) -> Iterator[None]:
    """Run the body, then put back ``module``'s gradients (the same tensors, or ``None``),
    buffers (their values), training mode and the global CPU (and CUDA) random state."""
    params = list(module.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    modes = [(m, m.training) for m in module.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _pipe_for(module: nn.Module, c: Configuration, devices: Any) -> Any:
    from gpipe.local.pipe import Pipe

    return Pipe(module, balance=list(c.balance), chunks=c.chunks, schedule=c.schedule,
                virtual_stages=c.virtual_stages, remat=c.remat, devices=devices)  # fmt: skip


def _step(
    module: nn.Module, pipe: Any, inputs: Any, targets: Any, loss_fn: Callable, reduction: Any
) -> Callable:
    """One training step of ``pipe`` from zero gradients (what a training loop times)."""

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        pipe.step(inputs, targets, loss_fn, reduction=reduction)

    return step


def median_time(step: Callable[[], object], steps: int, warmup: int) -> float:
    """The median wall time of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def autotune(
    module: nn.Module,
    ranked: Sequence[Configuration],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    devices: Any = None,
    top: int = 4,
    steps: int = 2,
    warmup: int = 1,
    rounds: int = 2,
    close: float = 0.05,
    reduction: Reduction = "mean",
) -> list[Measured]:
    """Time the first ``top`` configurations of ``ranked`` that fit (an :func:`autoplan`
    ranking) on ``module`` with one real batch (``inputs``, ``targets``, ``loss_fn`` and
    ``reduction`` as for :meth:`gpipe.Pipe.step`) and return them measured, fastest first.

    Each configuration runs ``warmup`` untimed steps in its first round, one in later rounds,
    then ``steps`` timed ones, in ``rounds`` rounds that alternate their order; then those
    within ``close`` (a fraction) of the fastest race on, up to ``rounds`` more rounds, until
    one leads by more. The median of a configuration's rounds decides. ``devices``
    are the pipeline devices (default: :class:`gpipe.Pipe`'s). Nothing of the timed steps
    stays on ``module`` (:func:`preserved`); a configuration that fails names itself.
    """
    for name, value, least in (("top", top, 1), ("steps", steps, 1), ("rounds", rounds, 1),
                               ("warmup", warmup, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"autotune: {name} must be an integer >= {least}, got {value!r}")
    chosen = [c for c in ranked if c.fits][:top]
    if not chosen:
        raise ValueError("autotune: no configuration of the ranking fits; nothing to time")
    times: dict[int, list[float]] = {i: [] for i in range(len(chosen))}

    def time_round(r: int, which: list[int]) -> None:
        for i in which if r % 2 == 0 else which[::-1]:
            c = chosen[i]
            try:  # one pipe at a time: each hooks the same layers while it lives
                pipe = _pipe_for(module, c, devices)
                try:
                    times[i].append(median_time(_step(module, pipe, inputs, targets, loss_fn, reduction),
                                                steps, warmup if not times[i] else 1))  # fmt: skip
                finally:
                    pipe.close()
            except Exception as e:
                raise RuntimeError(
                    f"autotune: configuration #{c.rank} ({c.describe()}) failed: "
                    f"{type(e).__name__}: {e}"
                ) from e

    with preserved(module):
        for r in range(rounds):
            time_round(r, list(range(len(chosen))))
        # a race for the close ones: up to as many rounds again for those within ``close`` of
        # the fastest, so that a few percent is decided by more than two samples
        for r in range(rounds, 2 * rounds):
            best = min(statistics.median(t) for t in times.values())
            near = [i for i, t in times.items() if statistics.median(t) <= best * (1 + close)]
            if len(near) < 2:
                break
            time_round(r, near)
    out = [Measured(c, statistics.median(times[i]), tuple(times[i])) for i, c in enumerate(chosen)]
    return sorted(out, key=lambda x: (x.step_time, x.configuration.rank))


def table(measured: Sequence[Measured]) -> str:
    """A plain-text table: each configuration's planner rank, prediction and measurement."""
    head = ("#", "plan #", "configuration", "predicted", "measured", "error")
    best = measured[0].step_time if measured else 0.0
    rows = []
    for i, x in enumerate(measured):
        c = x.configuration
        ratio = f" ({x.step_time / best:.2f}x)" if i else ""
        rows.append((str(i + 1), str(c.rank), c.describe(), f"{c.step_time * 1e3:.1f} ms",
                     f"{x.step_time * 1e3:.1f} ms{ratio}", f"{x.error:+.0%}"))  # fmt: skip
    return text_table(head, rows)
