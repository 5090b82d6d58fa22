"""``DistributedPipe``: one process per pipeline device over ``torch.distributed``, same schedules,
same gradients as :class:`gpipe.Pipe` and as un-pipelined training.

Every rank builds ``DistributedPipe(model, ...)`` identically after
``torch.distributed.init_process_group`` (e.g. under ``torchrun``), then calls
``pipe.step(inputs, targets, loss_fn)`` identically every step. Construction proves the first
part: before any group is created the ranks exchange a fingerprint of their options and layers
(:mod:`gpipe.runtime.agree`) and all raise, naming what differs, if any two disagree — ranks
that disagree on the balance would otherwise train another model and return a plausible loss. Each rank runs the shared
executor loop (:func:`gpipe.runtime.executor.execute`) over its own stages with a
:class:`gpipe.runtime.dist.P2PTransport`: one executor, two transports.

Layout. With world size ``W`` (of ``process_group``) and ``K`` pipeline devices there are
``D = W // K`` data-parallel replicas; rank ``r`` is pipeline device ``r % K`` of replica
``r // K``. So ranks ``0..K-1`` form the first pipeline, ``K..2K-1`` the second, and the ranks
``d, K+d, 2K+d, ...`` hold the same stages (their *data-parallel group*). Pipeline device ``d``
runs the (virtual) stages ``s`` with ``s % K == d``. Replica ``j`` takes rows
``[j·B/D, (j+1)·B/D)`` of the global batch; its micro-batch ``i`` is micro-batch ``j·M + i`` of
the whole batch for the keyed random streams, so dropout draws what
:func:`gpipe.reference.reference_step` with ``chunks = D·M`` draws.

The module holds only this rank's layers (registered under their names in the full model, so
``state_dict`` keys are a subset of the full model's); layers of other ranks are moved to the
``meta`` device. A model built on ``meta`` is materialized layer by layer with
``to_empty`` + ``reset_parameters()`` under a random stream keyed by the layer index
(:func:`materialize` does the same for the whole model in one process). Tied parameters (the
same ``Parameter`` in two layers, or names given in ``tied=``) that land on different ranks
become one copy per rank: initialized from the rank holding the group's first name, their
gradients summed across those ranks after each step.

The invariant every test defends: after ``step`` the local parameters' gradients, and the
returned loss, equal those of :func:`gpipe.reference.reference_step` on the whole global batch
(with ``chunks = D·M`` and the same seed and step), up to float rounding; a failure on any rank
ends the step on every rank with an error naming the failing rank, stage and micro-batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpipe import options, plan, stepcore
from gpipe import remat as remat_mod
from gpipe.materialize import _free, _materialize, _param_slots, _tie_groups, materialize
from gpipe.microbatch import batch_size, num_microbatches, split
from gpipe.runtime import agree, collectives
from gpipe.runtime.dist import Failure, P2PTransport, PeerError, make_channels
from gpipe.runtime.executor import Aborted, StageError, StepData, execute, resolve_gpu_times
from gpipe.schedules import KIND_WORDS, Event, Schedule, ScheduleSpec
from gpipe.stage import Stage

__all__ = ["DistributedPipe", "PeerError", "materialize"]


def default_device(backend: str, env: Mapping[str, str]) -> torch.device:
    """This rank's compute device when none is given: under NCCL the GPU ``LOCAL_RANK`` names
    (torchrun sets it), refused without one; otherwise the CPU."""
    if backend != "nccl":
        return torch.device("cpu")
    local = env.get("LOCAL_RANK")
    if local is None or not local.isdigit():
        raise ValueError(
            f"DistributedPipe on NCCL needs this rank's GPU: LOCAL_RANK is {local!r}; launch "
            "with torchrun (which sets it) or pass device=torch.device('cuda', i)"
        )
    return torch.device("cuda", int(local))


def _failure_text(e: BaseException) -> str:
    """What went wrong, for the other ranks: the action and the original exception."""
    if isinstance(e, StageError) and e.__cause__ is not None:
        word = KIND_WORDS[e.action.kind]
        return f"{word} raised {type(e.__cause__).__name__}: {e.__cause__}"
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- the pipe


class DistributedPipe(nn.Module):
    """Pipeline (× data) parallel training of a sequential model, one process per device.

    Construct it identically on every rank of ``process_group`` (default: the whole job) after
    ``torch.distributed.init_process_group``; every rank of the job must construct it, in the
    same order as any other ``DistributedPipe``, since it creates process groups.

    Args:
        module: ``nn.Sequential`` (or list of modules), possibly built on the ``meta`` device.
        stages: pipeline devices K (default: ``W // data_parallel``, or ``len(balance) // V``,
            or W).
        balance: layers per (virtual) stage, K·V numbers. Default: by forward+backward FLOPs
            (:func:`gpipe.cost.profile`) on ``sample`` at construction, else on rank 0's first
            micro-batch at the first step (then the optimizer must be created after it).
        chunks: micro-batches M per replica and step.
        micro_batch_size: alternatively the micro-batch size (ranks that pass no data then
            need ``chunks``).
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved"``, ``"zb-h1"`` or a
            :class:`~gpipe.schedules.Schedule`.
        virtual_stages: V for ``"interleaved"`` (default 2).
        remat: re-materialization mode (``"always"``, ``"except_last"``, ``"never"``).
        seed: seed of the keyed random streams (dropout, and initialization from ``meta``).
        pinned: the first ``pinned`` layers stay on stage 0 when balancing by FLOPs.
        check_finite: raise (naming the micro-batch) when a loss is NaN or infinite, before
            its backward runs, as :class:`gpipe.Pipe` does.
        fetch: names of inner modules whose outputs each step collects, as with
            :class:`gpipe.Pipe`; a rank's ``fetched`` holds those of its own layers (this
            replica's rows), merged over its micro-batches and detached.
        process_group: the ranks running this pipeline (default: ``WORLD``).
        device: this rank's compute device (default: ``cuda:LOCAL_RANK`` under NCCL, refused
            without ``LOCAL_RANK``; else CPU).
        timeout: seconds any wait may last (messages, collectives, new groups).
        data_parallel: replicas D (default: ``W // K``); ``W`` must equal ``K · D``.
        tied: tuples of parameter names (as in the full model's
            ``named_parameters(remove_duplicate=False)``) that hold one value.
        init_fn: ``init_fn(layer)`` initializes a layer materialized from ``meta``.
        sample: an example global mini-batch (real or ``meta`` tensors) to balance on.
        batch_dim: the batch dimension of inputs and targets.
    """

    def __init__(
        self,
        module: nn.Module | Sequence[nn.Module],
        *,
        stages: int | None = None,
        balance: Sequence[int] | None = None,
        chunks: int | None = None,
        micro_batch_size: int | None = None,
        schedule: str | Schedule = "gpipe",
        virtual_stages: int | None = None,
        remat: str = "except_last",
        seed: int = 0,
        pinned: int = 0,
        check_finite: bool = False,
        fetch: Sequence[str] = (),
        process_group: Any = None,
        device: torch.device | str | None = None,
        timeout: float = 300.0,
        data_parallel: int | None = None,
        tied: Sequence[Sequence[str]] = (),
        init_fn: Callable[[nn.Module], None] | None = None,
        sample: Any = None,
        batch_dim: int = 0,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedPipe needs torch.distributed: call "
                "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
                "the environment for init_method='env://')"
            )
        self._pg = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self._pg)
        backend = dist.get_backend(self._pg)
        self.rng_step = 0
        self.check_finite = bool(check_finite)
        self.fetch_names: list[str] = []
        self._fetch_arg = fetch  # checked in _configure, so a bad one reaches every rank
        self.fetched: dict[str, Any] = {}
        self.last_events: list[Event] = []
        self._calls = 0
        self._closed = True  # until the transport exists
        # Check the arguments, then agree with every other rank before any group is created
        # (ranks that disagree on stages or data_parallel would create different groups).
        error: BaseException | None = None
        fingerprint = None
        self._timeout = 300.0
        try:
            self._configure(
                module, stages, balance, chunks, micro_batch_size, schedule, virtual_stages,
                remat, seed, pinned, device, timeout, data_parallel, tied, batch_dim, backend,
            )  # fmt: skip
            fingerprint = self._fingerprint(balance, sample)
        except Exception as e:
            error = e
        here = torch.device("cpu")  # where the gather's tensors live: the rank's GPU under NCCL
        if backend == "nccl":
            mine = getattr(self, "device", None)
            cuda = mine is not None and mine.type == "cuda"
            here = mine if cuda else torch.device("cuda", torch.cuda.current_device())
        agree.check(
            fingerprint, error, group=self._pg, timeout=self._timeout, device=here, rank=self.rank
        )
        self._init_fn = init_fn
        k, d = self.num_devices, self.data_parallel
        comm_device = self.device if backend == "nccl" else torch.device("cpu")

        # --- groups: every rank creates every group, in this order
        def g(r: int) -> int:  # rank in process_group -> global rank (new_group takes those)
            return r if self._pg is dist.group.WORLD else dist.get_global_rank(self._pg, r)

        self._replicas = [[g(j * k + dd) for dd in range(k)] for j in range(d)]
        td = timedelta(seconds=self._timeout)
        self._created: list[Any] = []
        if d > 1:
            pp = [dist.new_group(r, timeout=td) for r in self._replicas]
            self._pp_group = pp[self.replica]
            if k > 1:
                dp = [
                    dist.new_group([self._replicas[j][dd] for j in range(d)], timeout=td)
                    for dd in range(k)
                ]
                self._dp_group = dp[self.pipeline_device]
                self._created += dp
            else:
                self._dp_group = self._pg
            self._created += pp
        else:
            self._pp_group, self._dp_group = self._pg, None
        me = g(self.rank)
        channels = make_channels(self._replicas, me, self._timeout) if k > 1 else {}
        for pair in channels.values():
            self._created += list(pair)
        self._transport = P2PTransport(
            self.pipeline_device,
            k,
            self._replicas[self.replica],
            channels,
            timeout=self._timeout,
            comm_device=comm_device,
        )
        self._transport.placement = self._placement
        self._closed = False
        self._global_rank = me

        self._stages: list[Stage] | None = None
        self._balance: list[int] | None = None
        if balance is not None:
            self._build([int(b) for b in balance])
        elif sample is not None:
            try:
                sample_mb, sample_error = self._sample_microbatch(sample), None
            except Exception as e:
                sample_mb, sample_error = None, e
            self._build(self._agree_balance(sample_mb, sample_error, "split its sample"))

    def _configure(
        self,
        module: nn.Module | Sequence[nn.Module],
        stages: int | None,
        balance: Sequence[int] | None,
        chunks: int | None,
        micro_batch_size: int | None,
        schedule: str | Schedule,
        virtual_stages: int | None,
        remat: str,
        seed: int,
        pinned: int,
        device: torch.device | str | None,
        timeout: float,
        data_parallel: int | None,
        tied: Sequence[Sequence[str]],
        batch_dim: int,
        backend: str,
    ) -> None:
        """Check this rank's arguments and derive K, D, V, the device and the tie groups (no
        collective: :func:`gpipe.runtime.agree.check` runs after this on every rank)."""
        self._timeout = options.seconds("timeout", timeout)
        self._named = plan.layers_of(module, "DistributedPipe")
        self.fetch_names = options.names("fetch", self._fetch_arg)
        self._fetch_at = plan.fetch_points(self._named, self.fetch_names)
        if chunks is None and micro_batch_size is None:
            raise ValueError("give chunks= (micro-batches per step) or micro_batch_size=")
        self._chunks = None if chunks is None else options.count("chunks", chunks)
        self._mbs = (
            None
            if micro_batch_size is None
            else options.count("micro_batch_size", micro_batch_size)
        )
        self._batch_dim = options.integer("batch_dim", batch_dim)
        self._remat = remat_mod.check_mode(remat)
        self._seed = options.integer("seed", seed)
        self._pinned = options.count("pinned", pinned, minimum=0)

        # --- schedule, K, V
        self._spec = ScheduleSpec(schedule, virtual_stages)
        self._schedule_name = self._spec.name
        v, k_sched = self._spec.virtual_stages, self._spec.num_devices
        self._v = v
        world = dist.get_world_size(self._pg)
        if stages is not None:
            k = options.count("stages", stages)
        elif k_sched is not None:
            k = k_sched
        elif data_parallel is not None:
            if world % options.count("data_parallel", data_parallel):
                raise ValueError(
                    f"data_parallel={data_parallel} does not divide the {world} ranks of the "
                    f"process group; launch a multiple of {data_parallel} ranks or change "
                    "data_parallel="
                )
            k = world // data_parallel
        elif balance is not None:
            if isinstance(balance, (str, bytes)) or not isinstance(balance, Sequence):
                plan.check_balance(balance, len(self._named), 1, v, self._pinned)  # names it
            k = len(balance) // v
        else:
            k = world
        if data_parallel is not None:
            options.count("data_parallel", data_parallel)
        if k * v > len(self._named):  # the model's limit first, as gpipe.Pipe says it
            plan.check_stage_count(len(self._named), k, v, self._pinned)
        if k < 1 or world % k:
            raise ValueError(
                f"{world} ranks cannot form pipelines of {k} devices; the world size must be "
                f"a multiple of stages (W = stages x data_parallel): pass stages= that divides "
                f"{world}, or launch stages x data_parallel ranks"
            )
        d = world // k
        if data_parallel is not None and data_parallel != d:
            raise ValueError(
                f"data_parallel={data_parallel} x stages={k} = {data_parallel * k} ranks, but "
                f"the process group has {world}; launch {data_parallel * k} ranks or change "
                "data_parallel="
            )
        if k_sched is not None and k_sched != k:
            raise ValueError(
                f"the given schedule is built for {k_sched} devices, not {k}; build it for "
                f"{k} devices or pass stages={k_sched}"
            )
        self.num_devices, self.data_parallel = k, d
        self.pipeline_device, self.replica = self.rank % k, self.rank // k
        self._placement = self._spec.placement(k)  # stage -> pipeline device
        if balance is not None:
            plan.check_balance(balance, len(self._named), k, v, self._pinned)
        else:
            plan.check_stage_count(len(self._named), k, v, self._pinned)

        # --- device
        self.device = (
            default_device(backend, os.environ) if device is None else torch.device(device)
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and this rank's kernels use this GPU

        # --- ties (names validated now, groups resolved at build)
        self._tied = [tuple(t) for t in tied]
        self._slots = _param_slots(self._named)
        self._groups = _tie_groups(self._slots, self._tied)

    def _fingerprint(self, balance: Sequence[int] | None, sample: Any) -> dict[str, Any]:
        """Everything that defines this rank's model and schedule, as plain data: all ranks
        must hold the same (see :mod:`gpipe.runtime.agree`)."""
        fixed = self._spec.fixed
        return {
            "layers": [f"{n!r}: {agree.layer_signature(m)}" for n, m in self._named],
            "stages": self.num_devices,
            "data_parallel": self.data_parallel,
            "balance": None if balance is None else [int(b) for b in balance],
            "sample": None if balance is not None else "given" if sample is not None else "none",
            "chunks": self._chunks,
            "micro_batch_size": self._mbs,
            "schedule": self._schedule_name,
            "the custom schedule's actions": None
            if fixed is None
            else f"hash {agree.schedule_digest(fixed.actions)} (M={fixed.num_microbatches})",
            "virtual_stages": self._v,
            "remat": self._remat,
            "seed": self._seed,
            "pinned": self._pinned,
            "batch_dim": self._batch_dim,
            "tied parameters": [list(grp) for grp in self._groups],
        }

    # ----------------------------------------------------------------- plan

    def _sample_microbatch(self, sample: Any) -> tuple:
        per_replica = split(sample, self.data_parallel, batch_dim=self._batch_dim)[0]
        m = self._num_microbatches(per_replica)
        return split((per_replica,), m, batch_dim=self._batch_dim)[0]

    def _agree_balance(
        self,
        sample_mb: tuple | None,
        local_error: BaseException | None,
        doing: str = "start the first step",
    ) -> list[int]:
        """Rank 0 balances by FLOPs on its micro-batch; every rank gets the same answer.

        One bounded all-gather also carries each rank's ``local_error`` (inputs that could not
        be split, say), so that every rank raises the real cause — the failing rank its own
        error, the others the same type naming that rank — instead of a symptom.
        """
        mine: dict[str, Any] = {
            "error": None if local_error is None else agree.describe_error(local_error),
            "balance": None,
            "balance_error": None,
        }
        if self.rank == 0 and local_error is None:
            try:
                if sample_mb is None:
                    raise ValueError(
                        "rank 0 needs the inputs to balance the pipeline by FLOPs; pass them to "
                        "step() on rank 0, or give balance= or sample= to DistributedPipe"
                    )
                mine["balance"], _ = plan.auto_balance(
                    [m for _, m in self._named],
                    sample_mb,
                    self.num_devices * self._v,
                    pinned=self._pinned,
                    train=self.training,
                )
            except Exception as e:
                mine["balance_error"] = f"{type(e).__name__}: {e}"
        every = agree.gather(
            mine,
            self._pg,
            self._timeout,
            self._transport.comm_device,
            self.rank,
            "to balance the pipeline before the first step",
        )
        if local_error is not None:
            raise local_error
        for r, theirs in enumerate(every):
            if theirs["error"] is not None:
                agree.raise_remote(r, theirs["error"], f"could not {doing}")
        if every[0]["balance_error"] is not None:
            raise RuntimeError(
                f"balancing the pipeline on rank 0 failed: {every[0]['balance_error']}"
            )
        return list(every[0]["balance"])

    def _build(self, balance: list[int]) -> None:
        k = self.num_devices
        self._balance = balance
        stage_of = plan.stage_of_layers(balance)
        dev_of = [self._placement[s] for s in stage_of]
        local = [i for i, dd in enumerate(dev_of) if dd == self.pipeline_device]
        slots, groups = self._slots, self._groups
        error = None
        try:
            _materialize(self._named, local, self.device, self._seed, self._init_fn, groups, slots)
        except Exception as e:
            error = e
        # Agree before any collective below: a rank that failed must not leave others waiting.
        errors: list[Any] = [None] * dist.get_world_size(self._pg)
        text = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(errors, text, group=self._pg)
        if error is not None:
            raise error
        for r, t in enumerate(errors):
            if t is not None:
                raise RuntimeError(f"rank {r} could not build its stages: {t}")
        for i, (_, layer) in enumerate(self._named):
            if dev_of[i] != self.pipeline_device:
                _free(layer)
        for i in local:
            name, layer = self._named[i]
            if hasattr(self, name) and name not in self._modules:
                raise ValueError(
                    f"layer name {name!r} clashes with a DistributedPipe attribute; rename it"
                )
            self.add_module(name, layer)
        self._stages = plan.build_stages(
            self._named,
            balance,
            k,
            lambda s: self.device,
            remat=self._remat,
            seed=self._seed,
            fetch_at=self._fetch_at,
            only_device=self.pipeline_device,
            placement=self._placement,
        )
        self._stage_map = {st.index: st for st in self._stages}

        # Tie groups spanning several pipeline devices: one local copy each, one subgroup per
        # replica; every rank creates every subgroup in the same order.
        td = timedelta(seconds=self._timeout)
        self._ties: list[tuple[nn.Parameter, Any, int, bool]] = []
        self._not_counted: set[int] = set()
        for grp in groups:
            devs = sorted({dev_of[slots[n][0]] for n in grp})
            owner = dev_of[slots[grp[0]][0]]
            here = [n for n in grp if dev_of[slots[n][0]] == self.pipeline_device]
            local_p = None
            if here:
                _, mod, attr, _ = slots[here[0]]
                local_p = mod._parameters[attr]
                if owner != self.pipeline_device:
                    self._not_counted.add(id(local_p))
            if len(devs) < 2:
                continue
            subs = [dist.new_group([rep[dd] for dd in devs], timeout=td) for rep in self._replicas]
            self._created += subs
            if local_p is not None:
                sub = subs[self.replica]
                src = dist.get_group_rank(sub, self._replicas[self.replica][owner])
                with torch.no_grad():
                    dist.broadcast(local_p.data, group=sub, group_src=src)
                self._ties.append((local_p, sub, src, owner == self.pipeline_device))
        if self._dp_group is not None:
            src = dist.get_group_rank(self._dp_group, self._replicas[0][self.pipeline_device])
            with torch.no_grad():
                for t in [*self._local_params(), *self.buffers()]:
                    dist.broadcast(t.data, group=self._dp_group, group_src=src)

    def _local_params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for st in self._stages or []:
            for p in st.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _schedule(self, m: int) -> Schedule:
        return self._spec.get(self.num_devices, m)

    @property
    def balance(self) -> list[int] | None:
        """Layers per (virtual) stage, or ``None`` until the first step balances by FLOPs."""
        return None if self._balance is None else list(self._balance)

    @property
    def stage_indices(self) -> list[int]:
        """The (virtual) stages this rank runs."""
        return [st.index for st in self._stages or []]

    def _require_built(self, what: str) -> None:
        if self._stages is None:
            raise RuntimeError(
                f"{what}: the pipeline is not partitioned yet, so this rank does not know its "
                "layers. Pass balance=[...] or sample=<a batch> to DistributedPipe, or call "
                "step() once before creating the optimizer"
            )

    # ----------------------------------------------------------------- nn.Module surface

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """This rank's parameters (its stages' layers only)."""
        self._require_built("parameters()")
        return super().parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, named as in the full model."""
        self._require_built("named_parameters()")
        return super().named_parameters(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """This rank's layers' state, keys as in the full model's ``state_dict``."""
        self._require_built("state_dict()")
        return super().state_dict(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the local gradients; a no-op before the pipeline is partitioned."""
        if self._stages is not None:
            super().zero_grad(set_to_none)

    def forward(self, *args: Any) -> Any:
        raise RuntimeError(
            "DistributedPipe runs whole steps: use loss = pipe.step(inputs, targets, loss_fn) "
            "(under torch.no_grad() for evaluation)"
        )

    def __enter__(self) -> DistributedPipe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the receiver threads, remove hooks and release the process groups this pipe
        created (kept when the pipe broke: a peer may still hold them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        healthy = self._transport.broken is None
        self._transport.close()
        for st in self._stages or []:
            st.close()
        if healthy:
            # Every step ended with all messages and collectives complete on every rank, so the
            # groups are idle; a broken pipe leaves them to destroy_process_group().
            for grp in self._created:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(grp)
        self._created = []

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, pipeline_device={self.pipeline_device}/{self.num_devices}, "
            f"replica={self.replica}/{self.data_parallel}, stages={self.stage_indices}, "
            f"schedule={self._schedule_name!r}, remat={self._remat!r}"
        )

    # ----------------------------------------------------------------- step

    def _num_microbatches(self, local: Any) -> int:
        """M for this replica's share of the batch; the errors use :func:`gpipe.microbatch.split`'s
        words for the same mistake (plus the replica's share with data parallelism)."""
        share = (
            ""
            if self.data_parallel == 1
            else f" (replica {self.replica}'s share of the global batch over "
            f"{self.data_parallel} data-parallel replicas)"
        )
        n = batch_size(local, self._batch_dim)
        return num_microbatches(n, self._chunks, self._mbs, batch_dim=self._batch_dim, share=share)

    def _local(self, obj: Any) -> Any:
        if self.data_parallel == 1:
            return obj
        n = batch_size(obj, self._batch_dim)
        if n % self.data_parallel:
            raise ValueError(
                f"the global batch of {n} rows does not split over {self.data_parallel} "
                "data-parallel replicas; use a batch size divisible by it"
            )
        return split(obj, self.data_parallel, batch_dim=self._batch_dim)[self.replica]

    def _prepare(self, inputs: Any, targets: Any) -> tuple[list | None, list | None, int]:
        first = self.pipeline_device == 0
        last = self.pipeline_device == self._placement[-1]
        x = self._local(inputs) if (first and inputs is not None) else None
        y = self._local(targets) if (last and targets is not None) else None
        if x is not None:
            m = self._num_microbatches(x)
        elif y is not None:
            m = self._num_microbatches(y)
        elif inputs is not None:
            m = self._num_microbatches(self._local(inputs))
        elif self._chunks is not None:
            m = self._chunks
        else:
            raise ValueError(
                "with micro_batch_size= and no chunks=, every rank must pass inputs (or "
                "targets) to know the number of micro-batches"
            )
        if first and x is None:
            raise ValueError(
                f"rank {self.rank} runs the first stage and needs the inputs; pass them to "
                "step() on this rank (other ranks may pass None)"
            )
        mbs = split((x,), m, batch_dim=self._batch_dim) if x is not None else None
        tmbs = split(y, m, batch_dim=self._batch_dim) if y is not None else None
        return mbs, tmbs, m

    def step(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """One pipelined forward+backward of the global mini-batch on every rank.

        Call it on every rank with the same arguments (``inputs`` are used by the first stage,
        ``targets`` by the last; other ranks may pass ``None``). Returns the loss, the same on
        every rank (averaged over data-parallel replicas). Gradients accumulate in the local
        parameters, already averaged over replicas and summed over tied copies. Under
        ``torch.no_grad()`` only the forward runs. A failure on any rank raises on every rank:
        the failing rank's :class:`~gpipe.runtime.executor.StageError`, or :class:`PeerError`
        naming it.
        """
        if self._closed:
            raise RuntimeError(
                "this DistributedPipe was closed (its process groups are released); construct a "
                "new one on every rank"
            )
        grad = torch.is_grad_enabled()
        local_error: BaseException | None = None
        mbs = tmbs = None
        try:  # a bad argument on one rank must reach the others, not leave them waiting
            stepcore.check_call(loss_fn, reduction)
            stepcore.check_targets(inputs, targets, self._batch_dim)
            mbs, tmbs, m = self._prepare(inputs, targets)
        except Exception as e:
            local_error, m = e, self._chunks or 1
        if self._stages is None:
            self._build(self._agree_balance(mbs[0] if mbs else None, local_error))
        sched = self._schedule(m)
        actions = (sched.actions if grad else sched.forward_part())[self.pipeline_device]
        step_id = self.rng_step
        if self.training:
            self.rng_step += 1
        assert self._stages is not None
        stepcore.begin(
            self._stages,
            step_id,
            m,
            grad,
            loss_fn,
            stepcore.loss_scale(reduction, m),
            check_finite=self.check_finite,
            rng_offset=self.replica * m,
        )
        self._transport.begin_step(self._calls, m)
        self._calls += 1
        # From here on every rank must reach finish_step, whatever happens.
        n_stages = self.num_devices * self._v
        last_dev = self._placement[-1]
        stash: list[torch.Tensor | None] = []
        data = StepData(n_stages, inputs=mbs, targets=tmbs, split_backward=sched.split_backward)
        loss = None
        try:
            stash = collectives.stash_tied(self._ties) if grad else []
            if local_error is None:
                with contextlib.suppress(Aborted):  # a peer failed: the transport knows who
                    execute(
                        self.pipeline_device,
                        actions,
                        self._stage_map,
                        self._transport,
                        data,
                        rank=self._global_rank,
                    )
            if self._transport.failure is None and self.pipeline_device == last_dev:
                loss = stepcore.total_loss(data.losses, m)
        except BaseException as e:
            local_error = local_error or e
            loss = None
        mine = None
        if local_error is not None:
            mine = Failure(
                self._global_rank,
                self.pipeline_device,
                getattr(local_error, "stage", None),
                getattr(local_error, "microbatch", None),
                _failure_text(local_error),
            )
        payloads = self._transport.finish_step(mine, {"loss": loss} if loss is not None else None)
        resolve_gpu_times(data)
        self.last_events = sorted(data.events, key=lambda e: e.start)
        self.fetched = stepcore.collect_fetched(data.fetched, self.fetch_names, m, self._batch_dim)
        failure = self._transport.failure
        if failure is None and loss is None:
            loss = payloads[last_dev]["loss"]
        loss, failure = self._replica_sync(loss, failure, reduction)
        if failure is not None:
            collectives.unstash(self._ties, stash)
            if local_error is not None:
                raise local_error
            raise PeerError(failure, self.rank)
        assert loss is not None
        if grad:
            collectives.sync_tied(self._ties, stash)
            if self._dp_group is not None:
                collectives.reduce_over_replicas(
                    [p for p in self._local_params() if p.requires_grad],
                    self._dp_group,
                    self.data_parallel,
                    average=reduction == "mean",
                )
        return loss.detach().to(self.device)

    def _replica_sync(
        self, loss: torch.Tensor | None, failure: Failure | None, reduction: str
    ) -> tuple[torch.Tensor | None, Failure | None]:
        return collectives.replica_sync(
            loss,
            failure,
            reduction,
            self._dp_group,
            self.data_parallel,
            self.num_devices,
            self._transport.comm_device,
        )

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of the whole pipeline (all stages) to ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does on the un-pipelined model; returns the total
        norm. Call it on every rank (it all-reduces over the pipeline's ranks); a tied
        parameter counts once."""
        self._require_built("clip_grad_norm_()")
        return collectives.clip_grad_norm(
            self._local_params(),
            self._not_counted,
            max_norm,
            norm_type,
            error_if_nonfinite,
            self._pp_group if self.num_devices > 1 else None,
            self._transport.comm_device,
            self.device,
        )
