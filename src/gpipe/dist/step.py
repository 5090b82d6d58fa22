"""One step of a distributed pipeline on this rank, and what follows it.

A step: this replica's share of the batch (or, with ``batch="per_replica"``, the shard it
was given) split into micro-batches (:func:`prepare`), the ranks' agreement on the call
(:mod:`gpipe.dist.call`: one all-gather, before any state changes), the shared
:func:`gpipe.core.step.begin`, this rank's executor loop over the transport, the end of
the step on every channel (``END`` carrying the last stage's loss, or ``ABORT``), the loss and
failure agreed over the replicas, then the collectives: tied copies' gradients summed, the
replicas' gradients averaged.

The pipe calls :func:`agree_call`, cuts its pipeline if the first step balances it, then
:func:`run_step`; both take the pipe's :class:`~gpipe.dist.config.DistConfig` and
:class:`~gpipe.dist.rank.RankParts`, never the pipe, and call nothing of it back.

The invariant: from :func:`gpipe.core.step.begin` on, every rank reaches the transport's
``finish_step`` whatever happens, so a failure anywhere ends the step on every rank with the
failing rank's own error there and :class:`~gpipe.dist.failures.PeerError` naming it
elsewhere; gradients and the returned loss equal those of the one-process reference with
``chunks = D·M``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpipe.base.microbatch import batch_size, num_microbatches, split
from gpipe.core import step as stepcore
from gpipe.core.executor import Aborted, StageError, StepData, execute, resolve_gpu_times
from gpipe.core.reduction import Reduction
from gpipe.dist import call as distcall
from gpipe.dist import collectives
from gpipe.dist.build import local_params
from gpipe.dist.config import DistConfig
from gpipe.dist.failures import Failure, PeerError
from gpipe.dist.rank import RankParts
from gpipe.nn import commit_over
from gpipe.schedules import KIND_WORDS

__all__ = [
    "Call",
    "StepLog",
    "agree_call",
    "failure_text",
    "local_share",
    "prepare",
    "run_step",
    "share_microbatches",
]


@dataclass
class StepLog:
    """What a distributed pipe's steps leave on this rank: the keyed random streams' step
    (``rng_step``, advanced by every training step), the steps begun (``calls``, the transport's
    message positions), and the last step's timeline and fetched outputs."""

    rng_step: int = 0
    calls: int = 0
    last_events: list[Any] = field(default_factory=list)
    last_events_t0: float = 0.0  # perf_counter time the events are counted from
    fetched: dict[str, Any] = field(default_factory=dict)


def failure_text(e: BaseException) -> str:
    """What went wrong, for the other ranks: the action and the original exception."""
    if isinstance(e, StageError) and e.__cause__ is not None:
        word = KIND_WORDS[e.action.kind]
        return f"{word} raised {type(e.__cause__).__name__}: {e.__cause__}"
    return f"{type(e).__name__}: {e}"


def share_microbatches(config: DistConfig, local: Any) -> int:
    """M for this replica's share of the batch; the errors use :func:`gpipe.base.microbatch.split`'s
    words for the same mistake (plus the replica's share with data parallelism)."""
    if config.data_parallel == 1:
        share = ""
    elif config.batch == "per_replica":
        share = f" (replica {config.layout.replica}'s shard)"
    else:
        share = (
            f" (replica {config.layout.replica}'s share of the global batch over "
            f"{config.data_parallel} data-parallel replicas)"
        )
    n = batch_size(local, config.options.batch_dim)
    return num_microbatches(
        n,
        config.options.chunks,
        config.options.micro_batch_size,
        batch_dim=config.options.batch_dim,
        share=share,
    )


def local_share(config: DistConfig, obj: Any) -> Any:
    """This replica's rows of the global ``obj`` (with ``batch="per_replica"``, ``obj`` is
    already this replica's shard)."""
    d = config.data_parallel
    if d == 1 or config.batch == "per_replica":
        return obj
    n = batch_size(obj, config.options.batch_dim)
    if n % d:
        raise ValueError(
            f"the global batch of {n} rows does not split over {d} data-parallel replicas; "
            "use a batch size divisible by it"
        )
    return split(obj, d, batch_dim=config.options.batch_dim)[config.layout.replica]


def prepare(config: DistConfig, inputs: Any, targets: Any) -> tuple[list | None, list | None, int]:
    """This rank's micro-batches of the inputs (first stage) and targets (last stage), and M."""
    layout = config.layout
    first = layout.pipeline_device == layout.first_device
    last = layout.pipeline_device == layout.last_device
    x = local_share(config, inputs) if (first and inputs is not None) else None
    y = local_share(config, targets) if (last and targets is not None) else None
    if x is not None:
        m = share_microbatches(config, x)
    elif y is not None:
        m = share_microbatches(config, y)
    elif inputs is not None:
        m = share_microbatches(config, local_share(config, inputs))
    elif config.options.chunks is not None:
        m = config.options.chunks
    else:
        raise ValueError(
            "with micro_batch_size= and no chunks=, every rank must pass inputs (or "
            "targets) to know the number of micro-batches"
        )
    if first and x is None:
        raise ValueError(
            f"rank {config.rank} runs the first stage and needs the inputs; pass them to "
            "step() on this rank (other ranks may pass None)"
        )
    mbs = split((x,), m, batch_dim=config.options.batch_dim) if x is not None else None
    tmbs = split(y, m, batch_dim=config.options.batch_dim) if y is not None else None
    return mbs, tmbs, m


@dataclass
class Call:
    """One step's call after every rank agreed on it (:func:`agree_call`): M, whether the
    backward runs, this rank's micro-batches and loss scales, and this rank's own error
    (reported to the others at the end of the step, not raised before)."""

    m: int
    grad: bool
    agreed: distcall.Agreed  # the replicas' rows and micro-batch counts
    inputs: list | None  # this rank's input micro-batches (first stage)
    targets: list | None  # this rank's target micro-batches (last stage)
    scales: list[float] | float = 1.0  # the last stage's loss scales
    items: float = 0.0  # this replica's items (counted on the last stage)
    error: BaseException | None = None

    @property
    def first_microbatch(self) -> tuple | None:
        """This rank's first input micro-batch (what rank 0 balances on), if it has one."""
        return self.inputs[0] if self.inputs else None


def agree_call(
    config: DistConfig,
    rank: RankParts,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    *,
    training: bool,
    check: Callable[[], None],
) -> Call:
    """Split this rank's batch and agree with every rank on the call (one all-gather): raises
    on every rank alike, before any state changes. ``check()`` is the pipe's own check of its
    model (a refusal there reaches the other ranks like a bad argument)."""
    grad = torch.is_grad_enabled()
    opts = config.options
    local_error: BaseException | None = None
    mbs = tmbs = None
    scales: list[float] | float = 1.0  # the last stage's, which computes the loss
    items = 0.0  # this replica's (counted on the last stage, which sends it with the loss)
    try:  # a bad argument on one rank must reach the others, not leave them waiting
        check()
        stepcore.check_call(loss_fn, reduction)
        stepcore.check_targets(inputs, targets, opts.batch_dim)
        mbs, tmbs, m = prepare(config, inputs, targets)
        if config.layout.pipeline_device == config.layout.last_device:
            whole = config.data_parallel == 1  # else other replicas may hold the items
            scales, items = stepcore.loss_scales(reduction, tmbs or [None] * m, whole)
    except Exception as e:
        local_error, m = e, opts.chunks or 1
    layout = config.layout
    call = distcall.describe(
        inputs,
        targets,
        training=training,
        grad=grad,
        num_microbatches=None if local_error is not None else m,
        batch_dim=opts.batch_dim,
    )
    agreed = distcall.check(
        call,
        group=rank.groups.calls,
        batch=config.batch,
        num_devices=layout.num_devices,
        data_parallel=layout.data_parallel,
        timeout=opts.timeout,
        rank=config.rank,
    )  # raises on every rank alike, before any state changes
    return Call(m, grad, agreed, mbs, tmbs, scales, items, local_error)


def run_step(
    config: DistConfig,
    rank: RankParts,
    log: StepLog,
    call: Call,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    *,
    training: bool,
) -> torch.Tensor:
    """The agreed ``call`` on this rank's stages (the body of
    :meth:`gpipe.DistributedPipe.step`, see there), recorded in ``log``; the pipeline must be
    cut (``rank.stages``) before."""
    layout, transport = config.layout, rank.transport
    m, grad, agreed, local_error = call.m, call.grad, call.agreed, call.error
    mbs, tmbs, scales, items = call.inputs, call.targets, call.scales, call.items
    sched = config.schedule(m)
    per_device = stepcore.step_actions(sched, grad)
    actions = per_device[layout.pipeline_device]
    step_id = log.rng_step
    bns = rank.deferred_bn  # this rank's, in stage order (alike on every replica)
    if training:
        log.rng_step += 1
        for bn in bns:  # accumulate over this replica's micro-batches; commit after the step
            bn.begin_step(m, defer=True)
    if rank.stages is None:
        raise RuntimeError("run_step: cut the pipeline (build this rank's stages) first")
    stepcore.begin(
        rank.stages,
        step_id,
        m,
        grad,
        loss_fn,
        scales,
        check_finite=config.options.check_finite,
        rng_offset=agreed.offset(layout.replica),
    )
    transport.begin_step(log.calls, m, per_device)
    log.calls += 1
    # From here on every rank must reach finish_step, whatever happens.
    last_dev = layout.last_device
    stash: list[torch.Tensor | None] = []
    # the last stage's outputs are never returned by step(): keep only their shapes, so no
    # micro-batch's output outlives its backward
    data = StepData(
        layout.num_stages, inputs=mbs, targets=tmbs, splits=sched.splits, keep_outputs=False
    )
    loss = None
    try:
        stash = collectives.stash_tied(rank.ties) if grad else []
        if rank.sharded is not None:  # gpipe.dist.fsdp: one gather / reduce-scatter per step
            rank.sharded.begin(grad, actions, reduction, layout.data_parallel)
        if local_error is None:
            with contextlib.suppress(Aborted):  # a peer failed: the transport knows who
                execute(
                    layout.pipeline_device,
                    actions,
                    rank.stage_map,
                    transport,
                    data,
                    rank=rank.global_rank,
                )
        if transport.failure is None and layout.pipeline_device == last_dev:
            loss = stepcore.total_loss(data.losses, m)
    except BaseException as e:
        local_error = local_error or e
        loss = None
    mine = None
    if local_error is not None:
        mine = Failure(
            rank.global_rank,
            layout.pipeline_device,
            getattr(local_error, "stage", None),
            getattr(local_error, "microbatch", None),
            failure_text(local_error),
        )
    # the loss travels inside the END header's metadata (a float holds any float dtype's value
    # exactly), so the end of a step costs no extra transfer
    end = None
    if loss is not None:
        end = {"loss": loss.item(), "dtype": str(loss.dtype)[6:], "items": items}
    payloads = transport.finish_step(mine, end)
    resolve_gpu_times(data)
    log.last_events = sorted(data.events, key=lambda e: e.start)
    log.last_events_t0 = data.t0
    log.fetched = stepcore.collect_fetched(
        data.fetched, list(config.options.fetch), m, config.options.batch_dim
    )
    failure = transport.failure
    if failure is None and loss is None:
        got = payloads[last_dev]
        loss = torch.tensor(got["loss"], dtype=getattr(torch, got["dtype"]))
        items = got["items"]
    loss, failure, weight = collectives.replica_sync(
        loss,
        failure,
        reduction,
        items,
        rank.groups.dp,
        layout.data_parallel,
        layout.num_devices,
        transport.comm_device,
        rows=agreed.rows if config.batch == "per_replica" else None,
    )
    if rank.sharded is not None:  # gpipe.dist.fsdp
        rank.sharded.end(grad, failed=failure is not None)
    if failure is not None:
        collectives.unstash(rank.ties, stash)
        for bn in bns:  # a failed step adds no statistics, and the layers commit as before
            bn.begin_step(bn.chunks)
        if local_error is not None:
            raise local_error
        raise PeerError(failure, config.rank)
    assert loss is not None
    if training:
        commit_over(bns, rank.groups.dp)  # the whole global batch's statistics
    if grad:
        sharded = rank.sharded.holds if rank.sharded is not None else lambda p: False
        collectives.sync_tied(rank.ties, stash)
        if rank.groups.dp is not None:
            collectives.reduce_over_replicas(
                [p for p in local_params(rank.stages) if p.requires_grad and not sharded(p)],
                rank.groups.dp,
                weight,
            )
    return loss.detach().to(config.device)
