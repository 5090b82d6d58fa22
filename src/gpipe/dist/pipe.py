"""``DistributedPipe``: one process per pipeline device over ``torch.distributed``, same schedules,
same gradients as :class:`gpipe.Pipe` and as un-pipelined training.

Every rank builds ``DistributedPipe(model, ...)`` identically after
``torch.distributed.init_process_group`` (e.g. under ``torchrun``), then calls
``pipe.step(inputs, targets, loss_fn)`` identically every step. Construction proves the first
part: before any group is created the ranks exchange a fingerprint of their options and layers
(:mod:`gpipe.dist.agree`) and all raise, naming what differs. Each step proves the second:
before any state changes the ranks compare their mode, grad mode and a checksum of their
batches (:mod:`gpipe.dist.call`). ``batch="same"`` (the default): every rank is given the whole
global mini-batch and each replica takes its share; ``batch="per_replica"``: each replica is
given its own shard (the DDP habit), the same on every rank of its pipeline. Each rank runs the shared
executor loop over its own stages with a :class:`gpipe.dist.transport.P2PTransport`.

Layout and groups (:mod:`gpipe.dist.layout`): rank ``r`` is pipeline device ``r % K`` of
replica ``r // K``; replica ``j``'s micro-batch ``i`` is micro-batch ``j·M + i`` of the whole
batch for the keyed random streams, so dropout draws what
:func:`gpipe.core.reference.reference_step` with ``chunks = D·M`` draws. Building this rank's share
is :mod:`gpipe.dist.build`; the step and the collectives after it are :mod:`gpipe.dist.step`.

The pipe's state is what the functions that make it return: ``config``
(:class:`~gpipe.dist.config.DistConfig`: the options shared with :class:`gpipe.Pipe`,
:class:`gpipe.core.options.PipeOptions`, and the layout), ``parts``
(:class:`~gpipe.dist.rank.RankParts`: groups, transport, stages, tied copies) and its step log.
A step is :func:`~gpipe.dist.step.agree_call`, the cut when the first step balances the
pipeline, then :func:`~gpipe.dist.step.run_step`; neither reads the pipe.

The module holds only this rank's layers (registered under their names in the full model, so
``state_dict`` keys are a subset of the full model's; for a captured model, of the model's own
keys, which ``load_state_dict`` takes); layers of other ranks are moved to the
``meta`` device. A model built on ``meta`` is materialized layer by layer with
``to_empty`` + ``reset_parameters()`` under a random stream keyed by the layer index
(:func:`materialize` does the same for the whole model in one process). Tied parameters (the
same ``Parameter`` in two layers, or names given in ``tied=``) that land on different ranks
become one copy per rank: initialized from the rank holding the group's first name, their
gradients summed across those ranks after each step.

The invariant every test defends: after ``step`` the local parameters' gradients, and the
returned loss, equal those of :func:`gpipe.core.reference.reference_step` on the whole global batch
(with ``chunks = D·M`` and the same seed and step), up to float rounding; a failure on any rank
ends the step on every rank with an error naming the failing rank, stage and micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpipe.base.compiling import refuse_compiling
from gpipe.capture import sequence
from gpipe.capture.segment import Loading
from gpipe.core import plan
from gpipe.core.auto import Auto
from gpipe.core.materialize import materialize
from gpipe.core.options import PipeOptions, pipe_options
from gpipe.core.reduction import Reduction
from gpipe.dist import agree, collectives
from gpipe.dist import fsdp as distfsdp
from gpipe.dist import mesh as distmesh
from gpipe.dist import call as distcall
from gpipe.dist import config as distconfig
from gpipe.dist import step as diststep
from gpipe.dist.build import agree_balance, build_rank, local_params, sample_microbatch
from gpipe.dist.layout import default_device
from gpipe.dist.rank import connect
from gpipe.dist.transport import PeerError
from gpipe.schedules import Event, Schedule

__all__ = ["DistributedPipe", "PeerError", "default_device", "materialize"]


# ----------------------------------------------------------------------------- the pipe


class DistributedPipe(plan.NotCopied, nn.Module):
    """Pipeline (× data) parallel training of a sequential model, one process per device.

    Construct it identically on every rank of ``process_group`` (default: the whole job) after
    ``torch.distributed.init_process_group``; every rank of the job must construct it, in the
    same order as any other ``DistributedPipe``, since it creates process groups.

    Args:
        module: ``nn.Sequential`` (or list of modules), possibly built on the ``meta`` device.
        stages: pipeline devices K (default: ``W // data_parallel``, or ``len(balance) // V``,
            or W).
        balance: layers per (virtual) stage, K·V numbers. Default: by forward+backward FLOPs
            (:func:`gpipe.planner.cost.profile`) on ``sample`` at construction, else on rank 0's first
            micro-batch at the first step (then the optimizer must be created after it).
        chunks: micro-batches M per replica and step.
        micro_batch_size: alternatively the micro-batch size (ranks that pass no data then
            need ``chunks``).
        schedule: a name of ``gpipe.schedules.available()`` (``"gpipe"``, ``"1f1b"``, ...),
            ``"auto"`` or a :class:`~gpipe.schedules.Schedule`.
        virtual_stages: V for the schedules of ``gpipe.schedules.interleaving()`` (default 2).
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
        sample: an example global mini-batch (real or ``meta`` tensors) to balance on; a
            module that is not a sequence is also captured on it (:mod:`gpipe.capture`).
            Ranks agree on its structure and shapes at construction.
        batch_dim: the batch dimension of inputs and targets.
        split_points: module paths where a captured model's stages are cut (one string is
            one point).
        deferred_batch_norm: replace every BatchNorm by :class:`gpipe.nn.DeferredBatchNorm`:
            running statistics of the whole global batch, summed over the replicas.
        batch: what each rank's ``step`` is given. ``"same"``: the whole global mini-batch,
            the same on every rank; each data-parallel replica takes its ``1/D`` share.
            ``"per_replica"``: each replica its own shard (as DDP with a
            ``DistributedSampler``), the same on every rank of that replica's pipeline; the
            pipeline splits the shard into M micro-batches and the step equals the plain
            model on the union of the shards (``sample=`` is then one replica's shard).
        mesh: a ``DeviceMesh`` with a ``"pp"`` dimension (and optionally ``"dp"`` before
            it, and any dimensions of the user's own, e.g. ``"tp"``): the pipe runs on this
            rank's ``("dp", "pp")`` slice (:mod:`gpipe.dist.mesh`).
        parallelize: ``fn(stage_module, mesh)`` applied to each stage of this rank once it
            is built (a module holding the stage's layers under their model names), e.g. a
            ``parallelize_module`` tensor-parallel plan; ``mesh`` is ``mesh=`` or, without
            one, the pipe's process group.
        fsdp: shard each stage's parameters, gradients and optimizer state over its
            ``data_parallel`` replicas with ``fully_shard`` (:mod:`gpipe.dist.fsdp`).
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
        split_points: str | Sequence[str] | None = None,
        deferred_batch_norm: bool = False,
        batch: str = "same",
        mesh: Any = None,
        parallelize: Callable[[nn.Module, Any], Any] | None = None,
        fsdp: bool = False,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedPipe needs torch.distributed: call "
                "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
                "the environment for init_method='env://')"
            )
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup (from "
                f"dist.new_group(...)) or None for every rank, got "
                f"{type(process_group).__name__} {process_group!r}"
            )
        # mesh= (gpipe.dist.mesh): this pipe runs on this rank's ("dp", "pp") slice
        self._mesh, self._parallelize = mesh, distmesh.check_parallelize(parallelize)
        self._siblings = None if mesh is None else distmesh.Siblings(mesh)
        if mesh is not None:
            process_group = distmesh.pipe_group(mesh, process_group, stages, data_parallel, timeout)
        self._pg = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self._pg)
        backend = dist.get_backend(self._pg)
        self._log = diststep.StepLog()
        self._closed = True  # until the transport exists
        # Check the arguments, then agree with every other rank before any group is created
        # (ranks that disagree on stages or data_parallel would create different groups).
        error: BaseException | None = None
        fingerprint = keys = None
        opts: PipeOptions | None = None
        config: distconfig.DistConfig | None = None
        batch_mode = "same"
        try:  # any other module is captured on sample (gpipe.capture), cut as split_points say
            given = module
            if init_fn is not None and not callable(init_fn):
                raise TypeError(
                    f"init_fn must be a function init_fn(layer) that initializes a layer built "
                    f"on meta, got {type(init_fn).__name__} {init_fn!r}"
                )
            batch_mode = distcall.check_batch_mode(batch)
            shards = batch_mode == "per_replica"  # sample= is one replica's shard
            module = sequence.front(
                module,
                "DistributedPipe",
                sample=sample,
                split_points=split_points,
                deferred_batch_norm=deferred_batch_norm,
            )
            self.training = sequence.mode_of(given)  # the model's mode; its layers keep their own
            self._follow = sequence.Follower(given, module)
            keys = sequence.model_keys(module)  # a captured model's own state_dict keys
            auto, self.auto_plan = Auto.of(schedule), None
            if auto is not None:  # schedule="auto": the planner's top plan, alike on every rank
                plan.cut_by(module, balance, stages=stages, virtual_stages=1, auto=True)
                k = stages or dist.get_world_size(self._pg) // (data_parallel or 1)
                sharing = 1 if shards else data_parallel or 1  # replicas that share the sample
                self.auto_plan = top = auto.for_distributed(
                    module,
                    sample,
                    stages=k,
                    data_parallel=sharing,
                    chunks=chunks,
                    fixed=(balance, micro_batch_size),
                    batch_dim=batch_dim,
                    pinned=pinned,
                )
                schedule, virtual_stages, remat = top.schedule, top.virtual_stages, top.remat
                balance, chunks = list(top.balance), top.chunks
            opts = pipe_options(
                stages=stages,
                chunks=chunks,
                micro_batch_size=micro_batch_size,
                batch_dim=batch_dim,
                schedule=schedule,
                virtual_stages=virtual_stages,
                remat=remat,
                seed=seed,
                pinned=pinned,
                fetch=fetch,
                timeout=timeout,
                check_finite=check_finite,
            )
            config = distconfig.configure(
                module,
                opts,
                rank=self.rank,
                world=dist.get_world_size(self._pg),
                balance=balance,
                device=device,
                data_parallel=data_parallel,
                tied=tied,
                backend=backend,
                batch=batch_mode,
                fsdp=fsdp,
            )
            distfsdp.check_fsdp(config.fsdp, config.data_parallel, False)  # gpipe.dist.fsdp
            fingerprint = distconfig.fingerprint(config, sample, keys is not None)
        except Exception as e:
            error = e
        here = torch.device("cpu")  # where the gather's tensors live: the rank's GPU under NCCL
        if backend == "nccl":
            cuda = config is not None and config.device.type == "cuda"
            here = config.device if cuda else torch.device("cuda", torch.cuda.current_device())
        agree.check(
            fingerprint,
            error,
            group=self._pg,
            timeout=300.0 if opts is None else opts.timeout,  # the default, if refused
            device=here,
            rank=self.rank,
        )
        assert config is not None  # agree.check raised on every rank otherwise
        self.config = config
        self._model_keys = keys
        if keys is not None:  # load_state_dict takes, and names, the model's own keys
            Loading(self, keys, lambda: self._modules)
        self._init_fn = init_fn
        # every rank creates every group, in one order, now
        new_group = None if self._siblings is None else self._siblings.new_group
        self.parts = connect(config, self._pg, backend, new_group=new_group)
        self._closed = False
        if config.balance is not None:
            self._cut(config.balance)
        elif sample is not None:
            try:
                sample_mb = sample_microbatch(
                    sample,
                    1 if config.batch == "per_replica" else config.data_parallel,
                    config.options.batch_dim,
                    lambda local: diststep.share_microbatches(config, local),
                )
                sample_error = None
            except Exception as e:
                sample_mb, sample_error = None, e
            self._agree_and_cut(sample_mb, sample_error, "split its sample")

    # ----------------------------------------------------------------- the options, read-only

    @property
    def options(self) -> PipeOptions:
        """The checked options shared with :class:`gpipe.Pipe` (with ``schedule="auto"``,
        the planner's choice)."""
        return self.config.options

    @property
    def num_devices(self) -> int:
        """Pipeline devices K."""
        return self.config.num_devices

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas D."""
        return self.config.data_parallel

    @property
    def pipeline_device(self) -> int:
        """The pipeline device this rank is."""
        return self.config.layout.pipeline_device

    @property
    def replica(self) -> int:
        """The data-parallel replica this rank belongs to."""
        return self.config.layout.replica

    @property
    def device(self) -> torch.device:
        """This rank's compute device."""
        return self.config.device

    @property
    def batch(self) -> str:
        """What each rank's ``step`` is given: ``"same"`` or ``"per_replica"``."""
        return self.config.batch

    @property
    def check_finite(self) -> bool:
        """Whether a NaN or infinite loss raises before its backward."""
        return self.config.options.check_finite

    @property
    def fetch_names(self) -> list[str]:
        """The inner modules whose outputs each step collects."""
        return list(self.config.options.fetch)

    @property
    def rng_step(self) -> int:
        """The keyed random streams' step: advanced by every training step (a checkpoint
        saves and restores it)."""
        return self._log.rng_step

    @rng_step.setter
    def rng_step(self, value: int) -> None:
        self._log.rng_step = int(value)

    @property
    def last_events(self) -> list[Event]:
        """The last step's timeline on this rank."""
        return self._log.last_events

    @property
    def last_events_t0(self) -> float:
        """The ``perf_counter`` time the last step's events are counted from."""
        return self._log.last_events_t0

    @property
    def fetched(self) -> dict[str, Any]:
        """The last step's outputs of ``fetch``'s modules held on this rank."""
        return self._log.fetched

    # ----------------------------------------------------------------- plan

    def _agree_and_cut(
        self,
        sample_mb: tuple | None,
        local_error: BaseException | None,
        doing: str = "start the first step",
    ) -> None:
        """Balance on rank 0's sample micro-batch, every rank taking the same cut, and cut."""
        c = self.config
        balance = agree_balance(
            c.named,
            sample_mb,
            local_error,
            rank=self.rank,
            num_stages=c.layout.num_stages,
            pinned=c.options.pinned,
            train=self.training,
            group=self._pg,
            timeout=c.options.timeout,
            comm_device=self.parts.transport.comm_device,
            doing=doing,
        )
        self._cut(balance)

    def _register(self, name: str, layer: nn.Module) -> None:
        if hasattr(self, name) and name not in self._modules:
            raise ValueError(
                f"layer name {name!r} clashes with a DistributedPipe attribute; rename it"
            )
        self.add_module(name, layer)

    def _cut(self, balance: list[int]) -> None:
        """Build this rank's stages of the pipeline cut by ``balance``."""
        c = self.config
        built = build_rank(
            c.named,
            balance,
            c.layout,
            self.parts.groups,
            self._register,
            device=c.device,
            seed=c.options.seed,
            init_fn=self._init_fn,
            slots=c.slots,
            tie_groups=c.tie_groups,
            remat=c.options.remat,
            fetch_at=c.fetch_at,
            process_group=self._pg,
            timeout=c.options.timeout,
            new_group=None if self._siblings is None else self._siblings.new_group,
        )
        if self._parallelize is not None:  # gpipe.dist.mesh: the user's TP / FSDP per stage
            on = self._mesh if self._mesh is not None else self._pg
            modules = distmesh.stage_modules(c.named, built.stages)
            distmesh.apply_parallelize(self._parallelize, modules, on)
        self.parts.attach(balance, built)
        if c.fsdp:  # gpipe.dist.fsdp: each stage sharded over its data-parallel replicas
            across = distfsdp.tied_across(c.tie_groups, c.slots, balance)
            distfsdp.check_fsdp(True, self.data_parallel, across)
            layers = [[layer for _, layer in st.layers] for st in built.stages]
            self.parts.sharded = distfsdp.Sharded(layers, self.parts.groups.dp, self.device)

    @property
    def balance(self) -> list[int] | None:
        """Layers per (virtual) stage, or ``None`` until the first step balances by FLOPs."""
        balance = self.parts.balance
        return None if balance is None else list(balance)

    @property
    def placement(self) -> tuple[int, ...]:
        """Stage → pipeline device, the schedule's placement (as ``gpipe.Pipe.placement``)."""
        layout = self.config.layout
        return tuple(layout.owner(s) for s in range(layout.num_stages))

    @property
    def stage_indices(self) -> list[int]:
        """The (virtual) stages this rank runs."""
        return [st.index for st in self.parts.stages or []]

    def _require_built(self, what: str) -> None:
        if self.parts.stages is None:
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

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:  # type: ignore[override]
        """This rank's layers' state, keys as in the full model's ``state_dict`` (a captured
        model's own keys, without its segments' names)."""
        self._require_built("state_dict()")
        if self._model_keys is not None:
            return self._model_keys.state_dict(
                self._modules, destination, prefix, keep_vars, tied_names=False
            )
        return super().state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )

    def train(self, mode: bool = True) -> DistributedPipe:
        """Set the mode of this rank's layers and, for a captured model, of the whole model
        (every rank's graphs then run the same mode's variant)."""
        super().train(mode)
        follow = getattr(self, "_follow", None)
        if follow is not None:
            follow.train(mode)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the local gradients; a no-op before the pipeline is partitioned."""
        if self.parts.stages is not None:
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
        """Close the transport, remove hooks and release the process groups this pipe
        created (kept when the pipe broke: a peer may still hold them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        healthy = self.parts.transport.broken is None
        self.parts.transport.close()
        for st in self.parts.stages or []:
            st.close()
        if healthy:
            # Every step ended with all messages and collectives complete on every rank, so the
            # groups are idle; a broken pipe leaves them to destroy_process_group().
            for grp in self.parts.created:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(grp)
        self.parts.created = []

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, pipeline_device={self.pipeline_device}/{self.num_devices}, "
            f"replica={self.replica}/{self.data_parallel}, stages={self.stage_indices}, "
            f"schedule={self.config.options.schedule_name!r}, remat={self.config.options.remat!r}"
        )

    # ----------------------------------------------------------------- step

    def step(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """One pipelined forward+backward of the global mini-batch on every rank.

        Call it on every rank with the same arguments (``inputs`` are used by the first stage,
        ``targets`` by the last; other ranks may pass ``None``; with ``batch="per_replica"``
        the same within each replica's pipeline, each replica its own shard), in the same
        ``train()``/``eval()`` and grad mode: the ranks compare these first (one small
        all-gather) and all raise ``ValueError`` naming the ranks and what differs, before
        any state changes. Returns the loss, the same on
        every rank (averaged over data-parallel replicas; ``reduction`` as in
        :meth:`gpipe.Pipe.step`, an item count weighting each replica by its items). Gradients accumulate in the local
        parameters, already averaged over replicas and summed over tied copies. Under
        ``torch.no_grad()`` only the forward runs. A failure on any rank raises on every rank:
        the failing rank's :class:`~gpipe.core.executor.StageError`, or :class:`PeerError`
        naming it.
        """
        refuse_compiling("DistributedPipe.step")
        if self._closed:
            raise RuntimeError(
                "this DistributedPipe was closed (its process groups are released); construct a "
                "new one on every rank"
            )
        call = diststep.agree_call(
            self.config,
            self.parts,
            inputs,
            targets,
            loss_fn,
            reduction,
            training=self.training,
            check=lambda: self._check_step(reduction),
        )
        if self.parts.stages is None:  # the first step balances the pipeline
            self._agree_and_cut(call.first_microbatch, call.error)
        return diststep.run_step(
            self.config, self.parts, self._log, call, loss_fn, reduction, training=self.training
        )

    def _check_step(self, reduction: Reduction) -> None:
        self._follow("this rank's pipe")
        if self.parts.sharded is not None:
            self.parts.sharded.check_call(reduction, self.batch)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of the whole pipeline (all stages) to ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does on the un-pipelined model; returns the total
        norm. Call it on every rank (it all-reduces over the pipeline's ranks); a tied
        parameter counts once."""
        self._require_built("clip_grad_norm_()")
        if self.parts.sharded is not None:  # gpipe.dist.fsdp: norms of the local shards
            return self.parts.sharded.clip_grad_norm(
                local_params(self.parts.stages or []),
                max_norm,
                norm_type,
                error_if_nonfinite,
                self.parts.groups.pp if self.num_devices > 1 else None,
                self.device,
            )
        return collectives.clip_grad_norm(
            local_params(self.parts.stages or []),
            self.parts.not_counted,
            max_norm,
            norm_type,
            error_if_nonfinite,
            self.parts.groups.pp if self.num_devices > 1 else None,
            self.parts.transport.comm_device,
            self.device,
        )
