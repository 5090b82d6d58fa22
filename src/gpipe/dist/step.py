"""One step of a distributed pipeline on this rank, and what follows it.

A step: this replica's share of the batch (or, with ``batch="per_replica"``, the shard it
was given) split into micro-batches (:func:`prepare`), the ranks' agreement on the call
(:mod:`gpipe.dist.call`: one all-gather, before any state changes), the shared
:func:`gpipe.core.step.begin`, this rank's executor loop over the transport, the end of
the step on every channel (``END`` carrying the last stage's loss, or ``ABORT``), the loss and
failure agreed over the replicas, then the collectives: tied copies' gradients summed, the
replicas' gradients averaged.

The invariant: from :func:`gpipe.core.step.begin` on, every rank reaches the transport's
``finish_step`` whatever happens, so a failure anywhere ends the step on every rank with the
failing rank's own error there and :class:`~gpipe.dist.failures.PeerError` naming it
elsewhere; gradients and the returned loss equal those of the one-process reference with
``chunks = D·M``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gpipe.dist import call as distcall

from gpipe.core import step as stepcore
from gpipe.dist.build import local_params
from gpipe.base.microbatch import batch_size, num_microbatches, split
from gpipe.nn import commit_over
from gpipe.core.reduction import Reduction
from gpipe.dist import collectives
from gpipe.core.executor import Aborted, StageError, StepData, execute, resolve_gpu_times
from gpipe.dist.failures import Failure, PeerError
from gpipe.schedules import KIND_WORDS

if TYPE_CHECKING:
    from gpipe.dist.pipe import DistributedPipe

__all__ = ["failure_text", "local_share", "prepare", "run_step", "share_microbatches"]


def failure_text(e: BaseException) -> str:
    """What went wrong, for the other ranks: the action and the original exception."""
    if isinstance(e, StageError) and e.__cause__ is not None:
        word = KIND_WORDS[e.action.kind]
        return f"{word} raised {type(e.__cause__).__name__}: {e.__cause__}"
    return f"{type(e).__name__}: {e}"


def share_microbatches(pipe: DistributedPipe, local: Any) -> int:
    """M for this replica's share of the batch; the errors use :func:`gpipe.base.microbatch.split`'s
    words for the same mistake (plus the replica's share with data parallelism)."""
    if pipe.data_parallel == 1:
        share = ""
    elif pipe.batch == "per_replica":
        share = f" (replica {pipe.replica}'s shard)"
    else:
        share = (
            f" (replica {pipe.replica}'s share of the global batch over "
            f"{pipe.data_parallel} data-parallel replicas)"
        )
    n = batch_size(local, pipe._batch_dim)
    return num_microbatches(n, pipe._chunks, pipe._mbs, batch_dim=pipe._batch_dim, share=share)


def local_share(pipe: DistributedPipe, obj: Any) -> Any:
    """This replica's rows of the global ``obj`` (with ``batch="per_replica"``, ``obj`` is
    already this replica's shard)."""
    d = pipe.data_parallel
    if d == 1 or pipe.batch == "per_replica":
        return obj
    n = batch_size(obj, pipe._batch_dim)
    if n % d:
        raise ValueError(
            f"the global batch of {n} rows does not split over {d} data-parallel replicas; "
            "use a batch size divisible by it"
        )
    return split(obj, d, batch_dim=pipe._batch_dim)[pipe.replica]


def prepare(
    pipe: DistributedPipe, inputs: Any, targets: Any
) -> tuple[list | None, list | None, int]:
    """This rank's micro-batches of the inputs (first stage) and targets (last stage), and M."""
    layout = pipe._layout
    first = layout.pipeline_device == layout.first_device
    last = layout.pipeline_device == layout.last_device
    x = local_share(pipe, inputs) if (first and inputs is not None) else None
    y = local_share(pipe, targets) if (last and targets is not None) else None
    if x is not None:
        m = share_microbatches(pipe, x)
    elif y is not None:
        m = share_microbatches(pipe, y)
    elif inputs is not None:
        m = share_microbatches(pipe, local_share(pipe, inputs))
    elif pipe._chunks is not None:
        m = pipe._chunks
    else:
        raise ValueError(
            "with micro_batch_size= and no chunks=, every rank must pass inputs (or "
            "targets) to know the number of micro-batches"
        )
    if first and x is None:
        raise ValueError(
            f"rank {pipe.rank} runs the first stage and needs the inputs; pass them to "
            "step() on this rank (other ranks may pass None)"
        )
    mbs = split((x,), m, batch_dim=pipe._batch_dim) if x is not None else None
    tmbs = split(y, m, batch_dim=pipe._batch_dim) if y is not None else None
    return mbs, tmbs, m


def run_step(
    pipe: DistributedPipe,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    check: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """The body of :meth:`gpipe.DistributedPipe.step` (see there); ``check()`` is the pipe's
    own check of its model (a refusal there reaches the other ranks like a bad argument)."""
    grad = torch.is_grad_enabled()
    local_error: BaseException | None = None
    mbs = tmbs = None
    scales: list[float] | float = 1.0  # the last stage's, which computes the loss
    items = 0.0  # this replica's (counted on the last stage, which sends it with the loss)
    try:  # a bad argument on one rank must reach the others, not leave them waiting
        check()
        stepcore.check_call(loss_fn, reduction)
        stepcore.check_targets(inputs, targets, pipe._batch_dim)
        mbs, tmbs, m = prepare(pipe, inputs, targets)
        if pipe._layout.pipeline_device == pipe._layout.last_device:
            whole = pipe.data_parallel == 1  # else other replicas may hold the items
            scales, items = stepcore.loss_scales(reduction, tmbs or [None] * m, whole)
    except Exception as e:
        local_error, m = e, pipe._chunks or 1
    layout, transport = pipe._layout, pipe._transport
    call = distcall.describe(
        inputs,
        targets,
        training=pipe.training,
        grad=grad,
        num_microbatches=None if local_error is not None else m,
        batch_dim=pipe._batch_dim,
    )
    agreed = distcall.check(
        call,
        group=pipe._groups.calls,
        batch=pipe.batch,
        num_devices=layout.num_devices,
        data_parallel=layout.data_parallel,
        timeout=pipe._timeout,
        rank=pipe.rank,
    )  # raises on every rank alike, before any state changes
    if pipe._stages is None:
        pipe._build(pipe._agree_balance(mbs[0] if mbs else None, local_error))
    sched = pipe._schedule(m)
    per_device = stepcore.step_actions(sched, grad)
    actions = per_device[layout.pipeline_device]
    step_id = pipe.rng_step
    bns = pipe._deferred_bn  # this rank's, in stage order (alike on every replica)
    if pipe.training:
        pipe.rng_step += 1
        for bn in bns:  # accumulate over this replica's micro-batches; commit after the step
            bn.begin_step(m, defer=True)
    assert pipe._stages is not None
    stepcore.begin(
        pipe._stages,
        step_id,
        m,
        grad,
        loss_fn,
        scales,
        check_finite=pipe.check_finite,
        rng_offset=agreed.offset(layout.replica),
    )
    transport.begin_step(pipe._calls, m, per_device)
    pipe._calls += 1
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
        stash = collectives.stash_tied(pipe._ties) if grad else []
        if pipe._sharded is not None:  # gpipe.dist.fsdp: one gather / reduce-scatter per step
            pipe._sharded.begin(grad, actions, reduction, layout.data_parallel)
        if local_error is None:
            with contextlib.suppress(Aborted):  # a peer failed: the transport knows who
                execute(
                    layout.pipeline_device,
                    actions,
                    pipe._stage_map,
                    transport,
                    data,
                    rank=pipe._global_rank,
                )
        if transport.failure is None and layout.pipeline_device == last_dev:
            loss = stepcore.total_loss(data.losses, m)
    except BaseException as e:
        local_error = local_error or e
        loss = None
    mine = None
    if local_error is not None:
        mine = Failure(
            pipe._global_rank,
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
    pipe.last_events = sorted(data.events, key=lambda e: e.start)
    pipe.last_events_t0 = data.t0
    pipe.fetched = stepcore.collect_fetched(data.fetched, pipe.fetch_names, m, pipe._batch_dim)
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
        pipe._groups.dp,
        layout.data_parallel,
        layout.num_devices,
        transport.comm_device,
        rows=agreed.rows if pipe.batch == "per_replica" else None,
    )
    if pipe._sharded is not None:  # gpipe.dist.fsdp
        pipe._sharded.end(grad, failed=failure is not None)
    if failure is not None:
        collectives.unstash(pipe._ties, stash)
        for bn in bns:  # a failed step adds no statistics, and the layers commit as before
            bn.begin_step(bn.chunks)
        if local_error is not None:
            raise local_error
        raise PeerError(failure, pipe.rank)
    assert loss is not None
    if pipe.training:
        commit_over(bns, pipe._groups.dp)  # the whole global batch's statistics
    if grad:
        sharded = pipe._sharded.holds if pipe._sharded is not None else lambda p: False
        collectives.sync_tied(pipe._ties, stash)
        if pipe._groups.dp is not None:
            collectives.reduce_over_replicas(
                [p for p in local_params(pipe._stages) if p.requires_grad and not sharded(p)],
                pipe._groups.dp,
                weight,
            )
    return loss.detach().to(pipe.device)
