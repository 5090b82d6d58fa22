"""The planner: every configuration of a pipeline predicted, ranked, the best one first.

:func:`autoplan` searches schedules × virtual stages V (for schedules that take them) ×
micro-batch counts M (divisors of the batch) × re-materialization modes, each cut into stages
by the optimal min-max balancer on that mode's per-layer cost. For each it predicts the step
time and bubble (:func:`gpipe.planner.simulate.simulate` on per-stage action costs — from FLOPs, or
measured with ``measure=True``) and the peak memory of every device
(:mod:`gpipe.planner.memory_model`), and ranks: configurations that fit the memory limit first,
fastest first.

The invariant: the ranking is a pure function of the costs and options, and the top
configuration fits the limit on every device (or, when stages share one memory, in all) —
when none does, :class:`NoFitError` names the smallest peak any configuration reaches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gpipe.base import options
from gpipe.base.microbatch import tree_flatten, tree_unflatten
from gpipe.base.texttable import text_table
from gpipe.capture import sample_args, sequence
from gpipe.planner import balance as balance_mod
from gpipe.planner import layer_timing
from gpipe.planner import memory_model as mm
from gpipe.planner.balance import balance as balance_costs
from gpipe.planner.cost import profile
from gpipe.planner.simulate import SimResult, simulate
from gpipe.schedules import Schedule, available, get
from gpipe.schedules.named import resolve_virtual
from gpipe.stage.remat import MODES, check_mode

__all__ = ["Configuration", "NoFitError", "autoplan", "check_search", "table"]

#: Seconds an action costs beyond its layers' own timings (``BENCHMARKS.md``, "The planner"):
#: on a CPU the runtime's bookkeeping (0.1–0.27 ms an action with free layers) and two workers
#: slowing each other on small micro-batches (an action of 2 rows ~1–1.4 ms over its layers
#: timed alone), which a per-layer model does not see; on a GPU the host's bookkeeping.
ACTION_OVERHEAD_S = {"cpu": 1e-3, "cuda": 5e-5}


class NoFitError(ValueError):
    """No configuration fits the memory limit."""


@dataclass(frozen=True)
class Configuration:
    """One ranked configuration and what the planner predicts for it (times in seconds)."""

    rank: int
    schedule: str
    virtual_stages: int
    chunks: int
    balance: tuple[int, ...]
    remat: str
    step_time: float
    bubble: float
    memory: tuple[mm.DeviceMemory, ...]  # per pipeline device
    shared_peak: int | None  # all stages in one memory (one CPU process): their joint peak
    fits: bool
    cost_source: str  # "flops" or "measured"
    optimizer: str
    reason: str
    simulation: SimResult

    @property
    def peak_memory(self) -> int:
        """The limiting figure: the joint peak when stages share memory, else the worst
        device's."""
        return (
            self.shared_peak if self.shared_peak is not None else max(m.total for m in self.memory)
        )

    @property
    def peak_device(self) -> int:
        """The device with the largest predicted peak."""
        return max(range(len(self.memory)), key=lambda d: self.memory[d].total)

    def describe(self) -> str:
        """A one-line summary: ``interleaved V=2, M=8, remat never, balance [...]``."""
        v = f" V={self.virtual_stages}," if self.virtual_stages > 1 else ""
        return (
            f"{self.schedule}{v} M={self.chunks}, remat {self.remat}, balance {list(self.balance)}"
        )


def _micro_sample(sample: tuple, rows: int, model: Sequence[nn.Module]) -> tuple:
    """Fake tensors like ``sample``'s with ``rows`` rows along dim 0 (nothing allocated), on
    the sample's device — or the model's when the sample is on ``meta`` — so that profiling
    sees the kernels (e.g. the attention variant) that device runs."""
    device = next((v.device for _, v in tree_flatten(sample)[0] if isinstance(v, torch.Tensor)))
    if device.type == "meta":
        params = (p for layer in model for p in layer.parameters())
        device = next(params, torch.empty(0, device="meta")).device
    leaves, rebuild = tree_flatten(sample)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return tree_unflatten(
            rebuild,
            [
                torch.empty((rows, *v.shape[1:]), dtype=v.dtype, device=device)
                if isinstance(v, torch.Tensor) and v.dim()
                else v
                for _, v in leaves
            ],
        )


def _batch_rows(sample: tuple) -> int:
    for _, v in tree_flatten(sample)[0]:
        if isinstance(v, torch.Tensor) and v.dim():
            if not v.shape[0]:
                raise ValueError(
                    f"autoplan's sample has a batch of 0 rows (shape {tuple(v.shape)}); give "
                    "a sample with at least one row, or batch_size=<rows of a real batch>"
                )
            return int(v.shape[0])
    raise ValueError("autoplan needs a sample with at least one tensor with a batch dimension")


def _layers_and_inputs(model: Any, sample: Any) -> tuple[list[nn.Module], tuple]:
    """The layers to plan and the first layer's inputs: a sequence of layers and its sample
    as given; any other module captured on ``sample`` (as ``Pipe(model, sample=...)`` does)
    and the sample bound to its first layer's inputs."""
    if isinstance(model, nn.Module) and not isinstance(model, (nn.Sequential, nn.ModuleList)):
        layers = sequence.front(model, "autoplan", sample=sample)
        return list(layers), sequence.bind_inputs(layers, *sample_args(sample), "autoplan")
    return [m for _, m in sequence.layers_of(model, "autoplan")], (
        sample if isinstance(sample, tuple) else (sample,)
    )


def _bytes_of(obj: Any) -> int:
    return sum(
        v.numel() * v.element_size() for _, v in tree_flatten(obj)[0] if isinstance(v, torch.Tensor)
    )


def _devices(devices: int | Sequence[Any]) -> tuple[int, str, bool]:
    """(K, device type, whether all stages share one memory)."""
    if isinstance(devices, (str, torch.device)):
        raise TypeError(
            f"devices must be a count K or a list of K devices, got {devices!r}; write "
            "devices=2 for two devices, or devices=['cuda:0', 'cuda:1'] (or ['cpu', 'cpu'])"
        )
    if isinstance(devices, bool) or not isinstance(devices, (int, Sequence)):
        raise TypeError(f"devices must be a count K or a list of K devices, got {devices!r}")
    if isinstance(devices, int):
        k = options.count("devices", devices)
        return k, "cuda" if torch.cuda.is_available() else "cpu", False
    devs = [options.device(d) for d in devices]
    if not devs:
        raise ValueError("devices is empty; give a count K or K devices")
    kind = "cuda" if any(d.type == "cuda" for d in devs) else devs[0].type
    shared = all(d.type == "cpu" for d in devs) or len(set(devs)) == 1
    return len(devs), kind, shared


def _check_rate(name: str, value: Any, *, positive: bool) -> None:
    """A finite number (> 0 with ``positive``, else >= 0), or ``None`` for the default."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        least = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name} must be a finite number {least}, got {value!r}; leave it out for the default"
        )


def check_search(
    *,
    schedules: Sequence[str] | None = None,
    remat_modes: Sequence[str] = MODES,
    chunks: Sequence[int] | None = None,
    max_chunks: int = 32,
    virtual_stages: Sequence[int] = (2, 3, 4),
    headroom: float = 0.15,
    flops_per_second: float | None = None,
    action_overhead: float | None = None,
    split_extra: float = 0.1,
    repeats: int = 3,
) -> tuple[list[str], list[str]]:
    """The search's own options checked before any work (each mistake its own message, not
    "no schedule builds"); the schedule names and re-materialization modes to try."""
    names = available() if schedules is None else options.names("schedules", schedules)
    for name in names:
        resolve_virtual(name, None)  # an unknown name is refused with the nearest one
    if not names:
        raise ValueError(f"schedules is empty; give some of {available()} or None for all")
    modes = options.names("remat_modes", remat_modes)
    if not modes:
        raise ValueError(f"remat_modes is empty; give some of {list(MODES)}")
    modes = [check_mode(m) for m in modes]
    options.count("max_chunks", max_chunks)
    if chunks is not None:
        if isinstance(chunks, (int, str)) or not isinstance(chunks, Sequence) or not chunks:
            raise TypeError(
                f"chunks must be a non-empty list of micro-batch counts, got {chunks!r}"
            )
        for m in chunks:
            options.count("chunks[...]", m)
    if isinstance(virtual_stages, (int, str)) or not isinstance(virtual_stages, Sequence):
        raise TypeError(
            f"virtual_stages must be a list of virtual-stage counts to try (e.g. [2, 3]), got "
            f"{virtual_stages!r}"
        )
    for v in virtual_stages:
        options.count("virtual_stages[...]", v)
    _check_rate("flops_per_second", flops_per_second, positive=True)
    _check_rate("action_overhead", action_overhead, positive=False)
    _check_rate("split_extra", split_extra, positive=False)
    options.count("repeats", repeats)
    if (
        isinstance(headroom, bool)
        or not isinstance(headroom, (int, float))
        or not (0 <= headroom < 1)
    ):
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    return names, modes


def _chunk_counts(batch: int, max_chunks: int, chunks: Sequence[int] | None) -> list[int]:
    if chunks is not None:
        bad = [m for m in chunks if m < 1 or batch % m]
        if bad:
            raise ValueError(f"chunks {bad} do not divide the batch of {batch} rows")
        return sorted(set(chunks))
    return [m for m in range(1, min(batch, max_chunks) + 1) if batch % m == 0]


def _recompute_share(remat: str, m: int) -> float:
    return {"always": 1.0, "except_last": (m - 1) / m, "never": 0.0}[remat]


def _schedules(
    names: Sequence[str], k: int, m: int, n_layers: int, vs: Sequence[int]
) -> list[Schedule]:
    """Every (name, V) that builds for K and M and has enough layers; V=1 for single-stage
    schedules, each of ``vs`` for those that interleave."""
    out = []
    for name in names:
        for v in (None, *vs):
            if v is not None and k * v > n_layers:
                continue
            try:
                sched = get(name, k, m, virtual_stages=v)
            except ValueError:
                continue
            if v is None and sched.virtual_stages not in (1, *vs):
                continue  # a schedule's default V, not asked for
            if sched.num_stages <= n_layers and all(
                s.name != sched.name or s.virtual_stages != sched.virtual_stages for s in out
            ):
                out.append(sched)
    return out


def autoplan(
    model: nn.Module | Sequence[nn.Module],
    sample: Any,
    *,
    devices: int | Sequence[Any] = 2,
    memory_limit: int | str | None = None,
    batch_size: int | None = None,
    optimizer: str | int = "adam",
    measure: bool = False,
    schedules: Sequence[str] | None = None,
    remat_modes: Sequence[str] = MODES,
    chunks: Sequence[int] | None = None,
    max_chunks: int = 32,
    virtual_stages: Sequence[int] = (2, 3, 4),
    pinned: int = 0,
    flops_per_second: float | None = None,
    action_overhead: float | None = None,
    split_extra: float = 0.1,
    repeats: int = 3,
    headroom: float = 0.15,
) -> list[Configuration]:
    """Ranked configurations for training ``model`` on ``devices`` with ``sample`` batches.

    ``model`` is a sequence of layers, or any module, captured on ``sample`` and cut into
    layers as ``Pipe(model, sample=...)`` does. ``sample`` is one input batch (a tensor, or a
    tuple of the first layer's inputs; for a captured module also a dict of keywords or a
    ``gpipe.capture.Sample``); its rows along dim 0 are the batch size unless ``batch_size`` is
    given. ``devices`` is K, or the K devices (a list of CPUs, or one device repeated, means
    the stages share one memory and the limit applies to their joint peak). ``memory_limit``
    is bytes or a string such as ``"8GiB"`` per device; ``None`` or ``float("inf")`` means
    unlimited. Every option is checked before any profiling. ``optimizer`` names the optimizer whose
    state counts (``"adam"``: two slots of each parameter's dtype) or gives its slot count.

    Costs come from ``cost.profile``'s FLOPs at ``flops_per_second`` (default: a rough rate
    for the device kind), or, with ``measure=True``, from timing each layer's F, B and W on the
    real device for every micro-batch size searched (``repeats`` runs, median).
    ``action_overhead`` (seconds) is added to every action; ``split_extra`` is what a
    backward split into ``B`` and ``W`` costs beyond the whole one, as a share of it (``W``
    reads every kept output gradient back from memory: 5–15% on a CPU, ``BENCHMARKS.md``); a
    backward the schedule leaves whole costs the whole backward.

    ``chunks`` (default: every divisor of the batch up to ``max_chunks``) and
    ``virtual_stages`` (the V tried for interleaving schedules) bound the search.

    A configuration fits when its predicted peak leaves ``headroom`` (a fraction) of the limit
    free: measured peaks run up to ~20% above the model where activations are small (the
    allocator's caching, autograd's temporaries; ``BENCHMARKS.md``).

    Returns every configuration, ranked (``rank`` 1 is the choice); those that do not fit
    come last with ``fits=False``. Raises :class:`NoFitError` when none fits.
    """
    names, modes = check_search(
        schedules=schedules,
        remat_modes=remat_modes,
        chunks=chunks,
        max_chunks=max_chunks,
        virtual_stages=virtual_stages,
        headroom=headroom,
        flops_per_second=flops_per_second,
        action_overhead=action_overhead,
        split_extra=split_extra,
        repeats=repeats,
    )
    limit = mm.parse_limit(memory_limit)
    mm.optimizer_slots(optimizer)  # refuse an unknown optimizer before any work
    k, kind, shared = _devices(devices)
    named, sample = _layers_and_inputs(model, sample)
    if k > len(named):
        raise ValueError(
            f"autoplan got {k} devices but the model has {len(named)} layers, and every device "
            f"needs at least one; plan for at most {len(named)} devices"
        )
    balance_mod.check_stage_count(len(named), k, 1, options.count("pinned", pinned, minimum=0))
    if batch_size is not None:
        batch = options.count("batch_size", batch_size)
    else:
        batch = _batch_rows(sample)
    overhead = ACTION_OVERHEAD_S.get(kind, 1e-4) if action_overhead is None else action_overhead
    rate = flops_per_second or layer_timing.default_flops_per_second(kind, k)
    source = "measured" if measure else "flops"

    results = []
    counts = _chunk_counts(batch, max_chunks, chunks)
    for m in counts:
        rows = batch // m
        mb = _micro_sample(sample, rows, named)
        try:
            costs = profile(named, *mb)
        except RuntimeError as e:
            if m == counts[0]:
                raise
            # a layer that cannot take micro-batches this small (BatchNorm on one row):
            # this M and any larger cannot run; say so rather than drop them silently
            warnings.warn(
                f"autoplan: M={m} and more skipped, micro-batches of {rows} row(s) fail: "
                f"{str(e).split('. Check')[0]}",
                stacklevel=2,
            )
            break
        if measure:
            threads = max(1, torch.get_num_threads() // k) if kind == "cpu" else None
            real = layer_timing.rows_like(sample, rows)
            times = layer_timing.measure(named, real, repeats=repeats, threads=threads)
        else:
            times = layer_timing.from_flops(costs, rate)
        for sched in _schedules(names, k, m, len(named), virtual_stages):
            for remat in modes:
                results.append(
                    _evaluate(
                        sched,
                        remat,
                        costs,
                        times,
                        _bytes_of(mb),
                        overhead,
                        split_extra,
                        pinned,
                        optimizer,
                        shared,
                    )
                )
    usable = None if limit is None else int(limit * (1 - headroom))
    return _rank(results, limit, usable, source, shared)


def _evaluate(
    sched: Schedule,
    remat: str,
    costs: Sequence[Any],
    times: Sequence[tuple[float, float, float]],
    input_bytes: int,
    overhead: float,
    split_extra: float,
    pinned: int,
    optimizer: str | int,
    shared: bool,
) -> dict:
    n = sched.num_stages
    share = _recompute_share(remat, sched.num_microbatches)
    weights = [f * (1 + share) + b + w for f, b, w in times]
    counts = balance_costs([max(x, 1e-12) for x in weights], n, pinned=pinned)
    fwd, bwd, wgt, start = [], [], [], 0
    for c in counts:
        part = times[start : start + c]
        f = sum(t[0] for t in part)
        fwd.append(f + overhead)
        # the whole backward (and its recompute); a split one's B and W each cost their
        # share times 1 + split_extra, which also covers the second action's overhead
        bwd.append(f * share + sum(t[1] + t[2] for t in part) + overhead)
        wgt.append(sum(t[2] for t in part))
        start += c
    split = sched.split_backward
    sim = simulate(
        sched,
        fwd,
        bwd,
        weight_costs=wgt if split else None,
        split_overhead=split_extra if split else 0.0,
    )
    stages = mm.stage_memory(costs, counts, input_bytes)
    memory = mm.device_memory(sched, stages, remat, optimizer)
    joint = mm.process_peak(sim.events, sched, stages, remat, optimizer) if shared else None
    return dict(
        schedule=sched.name,
        virtual_stages=sched.virtual_stages,
        chunks=sched.num_microbatches,
        balance=tuple(counts),
        remat=remat,
        step_time=sim.makespan,
        bubble=sim.bubble,
        memory=tuple(memory),
        shared_peak=joint,
        optimizer=str(optimizer),
        simulation=sim,
    )


def _peak(r: dict) -> int:
    return r["shared_peak"] if r["shared_peak"] is not None else max(x.total for x in r["memory"])


def _rank(
    results: list[dict], limit: int | None, usable: int | None, source: str, shared: bool
) -> list[Configuration]:
    if not results:
        raise ValueError("no schedule builds for these devices and micro-batch counts")

    def fits(r: dict) -> bool:
        return usable is None or _peak(r) <= usable

    order = sorted(
        results,
        key=lambda r: (
            not fits(r),
            r["step_time"],
            _peak(r),
            r["schedule"],
            r["chunks"],
            r["virtual_stages"],
            r["remat"],
        ),
    )
    if not fits(order[0]):
        best = min(results, key=_peak)
        where = (
            "all stages together (they share one memory)"
            if shared
            else (
                f"device {max(range(len(best['memory'])), key=lambda d: best['memory'][d].total)}"
            )
        )
        raise NoFitError(
            f"no configuration fits memory_limit={mm_fmt(limit)}: the smallest peak any "
            f"reaches is {mm_fmt(_peak(best))} on {where} ({best['schedule']}, "
            f"M={best['chunks']}, remat {best['remat']}), and a plan must stay under "
            f"{mm_fmt(usable)} (the limit less its headroom); raise the limit, use more devices, "
            "a smaller batch, or an optimizer with less state"
        )
    top = order[0]
    out = []
    for i, r in enumerate(order):
        ok = fits(r)
        if i == 0:
            room = f", {mm_fmt(limit - _peak(r))} under the limit" if limit is not None else ""
            why = f"fastest that fits ({mm_fmt(_peak(r))} peak{room})"
        elif not ok:
            why = f"does not fit: needs {mm_fmt(_peak(r))} > {mm_fmt(usable)} usable"
        else:
            slower = r["step_time"] / top["step_time"] - 1 if top["step_time"] else 0.0
            why = f"{slower:+.1%} step time vs #1, bubble {r['bubble']:.0%}"
        out.append(Configuration(rank=i + 1, fits=ok, cost_source=source, reason=why, **r))
    return out


def mm_fmt(n: float | None) -> str:
    """Bytes in readable units (``1.5 GiB``)."""
    if n is None:
        return "none"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(configs: Sequence[Configuration], top: int = 10) -> str:
    """A plain-text table of the first ``top`` configurations."""
    head = ("#", "schedule", "V", "M", "remat", "balance", "step", "bubble", "peak", "on", "reason")
    rows = []
    for c in list(configs)[:top]:
        on = "all" if c.shared_peak is not None else f"dev {c.peak_device}"
        rows.append(
            (
                str(c.rank),
                c.schedule,
                str(c.virtual_stages),
                str(c.chunks),
                c.remat,
                ",".join(map(str, c.balance)),
                f"{c.step_time * 1e3:.1f} ms",
                f"{c.bubble:.1%}",
                mm_fmt(c.peak_memory),
                on,
                c.reason,
            )
        )
    return text_table(head, rows)
