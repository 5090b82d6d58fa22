"""One interface over both pipes, so the trainer has one path for both runtimes.

:func:`build` is the only place that knows the runtime: it wraps a :class:`gpipe.Pipe` (threads
in one process) or a :class:`gpipe.DistributedPipe` (one process per stage) in a
:class:`TrainerPipe`, which gives the trainer what it needs and nothing runtime-specific:

* the step, the global gradient clipping (one formula for both: a float64 sum of squared
  per-parameter norms, as ``DistributedPipe.clip_grad_norm_`` computes it), train/eval, the
  dropout streams' position (``rng_step``) and where inputs and targets go;
* this process's parameters under the full model's names (a tied copy under the name of the
  parameter it copies), and the shards of model tensors this process writes when saving;
* the collectives a save, a restore and a timeline need, :meth:`TrainerPipe.gather` and
  :meth:`TrainerPipe.broadcast` — trivial in one process, over a gloo group with a timeout
  across processes, so every wait is bounded;
* the last step's timeline of every device on one clock (:meth:`TrainerPipe.timeline`): each
  process sends its events with its wall-clock offset (``time.time() - time.perf_counter()``)
  and the ``perf_counter`` time its events count from (the pipe's ``last_events_t0``), so
  events of different processes line up.

The invariant: every method either touches only this process's state or is a collective that
every process calls in the same order (step, clip, gather, broadcast, timeline), so the
trainer's code, run identically by every rank, never leaves one rank waiting unboundedly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from gpipe.core import clip
from gpipe.schedules import Event

__all__ = ["TrainerPipe", "build", "canonical_names", "clip_global_norm_", "stage_lines"]


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name of ``model`` (duplicates included) → the name
    ``model.named_parameters()`` gives that parameter (its first name), as the model's
    ``state_dict`` keys it (a captured model's own names)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), _model_key(model, name))
    return out


def _model_key(model: nn.Module, name: str) -> str:
    """``name`` (``layer.key``) as the model's ``state_dict`` names it: a captured model's
    segments hold the model's own keys, so the layer's name is dropped."""
    from gpipe.capture import CapturedLayers

    return name.partition(".")[2] if isinstance(model, CapturedLayers) else name


def clip_global_norm_(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients of ``params`` to global L2 norm ``max_norm``; return the norm
    (:func:`gpipe.core.clip.clip_grad_norm_`, the function ``DistributedPipe.clip_grad_norm_``
    uses too, so both runtimes clip by the same factor)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = clip.clip_grad_norm_(grads, grads, max_norm)
    return total.to(grads[0].dtype if grads else torch.float32)


class TrainerPipe:
    """What the trainer sees of a pipe, whatever the runtime (see the module docstring).

    ``runtime``, ``stages``, ``data_parallel``, ``schedule`` and ``balance`` describe the
    topology (recorded in every saved state); ``rank``/``world``/``replica``/``device_index``
    place this process; ``is_main`` is the process that reports and commits saves.
    """

    runtime = "local"

    def __init__(
        self,
        pipe: Any,
        model: nn.Module,
        config: Any,
        balance: Sequence[int],
        canonical: dict[str, str],
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.stages = int(config.stages)
        self.data_parallel = int(config.data_parallel)
        self.schedule = str(config.schedule)
        self.virtual_stages = config.per_device()
        self.balance = [int(b) for b in balance]
        self.rank, self.world = 0, 1
        self.replica, self.device_index = 0, 0
        self._canonical = canonical
        self._wall = time.time() - time.perf_counter()

    # ----------------------------------------------------------------- facts

    @property
    def is_main(self) -> bool:
        """True on the process that reports and commits (rank 0, or the only process)."""
        return self.rank == 0

    @property
    def writes_state(self) -> bool:
        """Whether this process writes shards when saving (data-parallel replica 0)."""
        return self.replica == 0

    @property
    def num_lanes(self) -> int:
        """Devices of the whole job: one timeline lane each."""
        return self.stages * self.data_parallel

    def topology(self) -> dict[str, Any]:
        """The topology a saved state records."""
        return {
            "runtime": self.runtime,
            "stages": self.stages,
            "balance": list(self.balance),
            "data_parallel": self.data_parallel,
            "schedule": self.schedule,
            "virtual_stages": self.virtual_stages,
        }

    def devices(self) -> tuple[torch.device, torch.device]:
        """Where the inputs (first stage) and the targets (last stage) go."""
        devs = self.pipe.devices
        return devs[0], devs[-1]

    def describe(self) -> list[str]:
        """One line per (virtual) stage: its layers and where it runs."""
        return [str(part) for part in self.pipe.partitions]

    @property
    def rng_step(self) -> int:
        """Training steps the dropout streams have advanced by."""
        return int(self.pipe.rng_step)

    @rng_step.setter
    def rng_step(self, value: int) -> None:
        self.pipe.rng_step = int(value)

    # ----------------------------------------------------------------- training

    def train(self) -> None:
        """Training mode (dropout on; each step advances the streams)."""
        self.pipe.train()

    def eval(self) -> None:
        """Evaluation mode."""
        self.pipe.eval()

    def step(self, x: Any, y: Any, loss_fn: Callable[[Any, Any], Tensor]) -> Tensor:
        """One pipelined forward (+ backward when grad is enabled) of the mini-batch."""
        return self.pipe.step(x, y, loss_fn)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This process's parameters, named as ``model.named_parameters()`` names them (a tied
        copy under its original's name), each once."""
        seen: set[int] = set()
        out = []
        for name, p in self._local_named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((self._canonical.get(name, name), p))
        return out

    def _local_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the whole pipeline's gradients to global norm ``max_norm``; return the norm."""
        params = [p for _, p in self.named_parameters()]
        return float(clip_global_norm_(params, max_norm))

    # ----------------------------------------------------------------- state

    def shards(self) -> list[tuple[int, dict[str, Tensor]]]:
        """The (pipeline device, tensors by full-model name) shards this process writes."""
        children = dict(self.model.named_children())
        out: dict[int, dict[str, Tensor]] = {}
        for part in self.pipe.partitions:
            shard = out.setdefault(self.pipe.placement[part.stage], {})
            for layer in part.layers:
                for key, v in children[layer].state_dict().items():
                    shard[_model_key(self.model, f"{layer}.{key}")] = v
        return sorted(out.items())

    def local_state(self) -> dict[str, Tensor]:
        """Every tensor this process holds, by full-model name (what a restore fills in)."""
        return dict(self.model.state_dict())

    # ----------------------------------------------------------------- collectives

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        return self.gather(obj)[0]

    def timeline(self) -> list[Event]:
        """The last step's events of every device on one clock starting at 0 (a collective
        under the distributed runtime); lane = replica · stages + pipeline device."""
        events = list(getattr(self.pipe, "last_events", None) or [])
        t0 = float(getattr(self.pipe, "last_events_t0", 0.0))
        rows = self.gather((self.replica, self._wall + t0, events))
        out: list[Event] = []
        base = math.inf
        for _, t0, evs in rows:
            if evs:
                base = min(base, t0 + min(e.start for e in evs))
        for replica, t0, evs in rows:
            shift = t0 - base
            for e in evs:
                lane = replica * self.stages + e.device
                out.append(replace(e, device=lane, start=e.start + shift, end=e.end + shift))
        return sorted(out, key=lambda e: (e.start, e.device))

    def lane_names(self) -> dict[int, str]:
        """Timeline lane → its name where a lane is a process (none in one process)."""
        if self.world == 1:
            return {}
        k = self.stages
        return {r: f"rank {r} (replica {r // k}, device {r % k})" for r in range(self.world)}

    def close(self) -> None:
        """Stop the pipe's workers (and release its groups)."""
        self.pipe.close()


def stage_lines(
    names: Sequence[str],
    balance: Sequence[int],
    placement: Sequence[int],
    stages: int,
    world: int,
) -> list[str]:
    """One line per (virtual) stage of a distributed run: its layers and the ranks that run it
    — pipeline device ``placement[s]`` (the schedule's placement, a V for zb-v and dualpipe-v)
    of every replica (rank ``replica * stages + device``)."""
    lines, at = [], 0
    for s, n in enumerate(balance):
        layers = ", ".join(names[at : at + n])
        ranks = list(range(placement[s], world, stages))
        which = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        lines.append(f"stage {s} on {which}: [{layers}]")
        at += n
    return lines


class _DistTrainerPipe(TrainerPipe):
    """A :class:`gpipe.DistributedPipe` behind the trainer's interface. Rank ``r`` is pipeline
    device ``r % stages`` of replica ``r // stages`` (DistributedPipe's layout)."""

    runtime = "dist"

    def __init__(
        self,
        pipe: Any,
        model: nn.Module,
        config: Any,
        balance: Sequence[int],
        canonical: dict[str, str],
        timeout: float,
    ) -> None:
        import torch.distributed as dist

        super().__init__(pipe, model, config, balance, canonical)
        self.rank = int(pipe.rank)
        self.world = dist.get_world_size()
        self.replica = self.rank // self.stages
        self.device_index = self.rank % self.stages
        # Made identically on every rank right after the pipe's own groups; gloo, so CPU
        # objects travel under NCCL too, and bounded by the timeout.
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))

    def devices(self) -> tuple[torch.device, torch.device]:
        dev = next(iter(self.pipe.parameters()), torch.empty(0)).device
        return dev, dev

    def describe(self) -> list[str]:
        names = [n for n, _ in self.model.named_children()]
        return stage_lines(names, self.balance, self.pipe.placement, self.stages, self.world)

    def _local_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.pipe.named_parameters())

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(self.pipe.clip_grad_norm_(max_norm))

    def shards(self) -> list[tuple[int, dict[str, Tensor]]]:
        if not self.writes_state:
            return []
        return [(self.device_index, self.local_state())]

    def local_state(self) -> dict[str, Tensor]:
        return dict(self.pipe.state_dict())  # the full model's keys (a captured one's own)

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        super().close()
        group, self._group = self._group, None
        if group is not None:
            with contextlib.suppress(Exception):  # the job is ending anyway
                dist.destroy_process_group(group)


def build(
    config: Any, model: nn.Module, balance: Sequence[int], *, timeout: float = 300.0
) -> TrainerPipe:
    """The pipe of ``config.runtime`` over ``model`` cut by ``balance``: the one place the
    trainer's code depends on the runtime."""
    canonical = canonical_names(model)  # before a distributed pipe frees other ranks' layers
    kw = dict(
        balance=list(balance),
        chunks=config.chunks,
        schedule=config.schedule,
        virtual_stages=config.virtual_stages,
        remat=config.remat,
        seed=config.seed,
    )
    if config.runtime == "dist":
        from gpipe.dist.pipe import DistributedPipe

        pipe = DistributedPipe(
            model, stages=config.stages, data_parallel=config.data_parallel, timeout=timeout, **kw
        )
        return _DistTrainerPipe(pipe, model, config, balance, canonical, timeout)
    from gpipe.local.pipe import Pipe

    return TrainerPipe(Pipe(model, **kw), model, config, balance, canonical)
