"""``gpipe.Pipe``: a sequential model trained as a pipeline on several devices of one process.

The user-facing module. It cuts the layers into stages (balanced by FLOPs from the cost model
unless ``balance`` is given), places each stage on its device, splits every mini-batch into
micro-batches, and runs the chosen schedule on one worker thread per device.

Two ways to train, with the same result:

* ``loss_fn(pipe(x), y).backward()`` — the forward runs the schedule's forward actions, the
  backward (through a custom autograd function) runs its backward actions. Only for schedules
  that finish all forwards before any backward (``"gpipe"``).
* ``loss = pipe.step(x, y, loss_fn)`` — the loss is computed per micro-batch inside the last
  stage, so every schedule (1F1B, interleaved, zero-bubble) can run.

The invariant every test defends: the parameters' gradients equal those of un-pipelined
training on the whole mini-batch (:func:`gpipe.core.reference.reference_step` with the same keyed
random streams), up to float rounding, for every schedule, stage count, micro-batch count and
re-materialization mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from gpipe.base import options
from gpipe.base.compiling import refuse_compiling
from gpipe.base.microbatch import split, tree_flatten
from gpipe.capture import sequence
from gpipe.core import clip, plan
from gpipe.core import step as stepcore
from gpipe.core.auto import Auto
from gpipe.core.executor import StepData, Timeline
from gpipe.core.options import pipe_options
from gpipe.core.reduction import Reduction
from gpipe.local.bridge import Run, backward_into_inputs, needs_grad_of
from gpipe.local.devices import Partition, partitions, pipe_devices
from gpipe.local.race import race
from gpipe.local.runner import LocalRunner
from gpipe.local.workers import ThreadState
from gpipe.nn import deferred_in
from gpipe.planner import balance as balance_mod
from gpipe.schedules import Event, Schedule, ScheduleSpec
from gpipe.stage import amp, shared_params
from gpipe.stage.stage import Stage, StepState

__all__ = ["Partition", "Pipe"]


class Pipe(plan.NotCopied, nn.Module):
    """Pipeline-parallel wrapper around a sequential ``module``.

    Args:
        module: an ``nn.Sequential`` (or list of modules); each layer takes the previous one's
            output. The first layer receives ``pipe(*inputs)``'s arguments. Any other module
            is captured on ``sample`` and cut into layers (:mod:`gpipe.capture`).
        stages: number of devices K (default: ``len(balance)``, or the number of devices).
        balance: layers per stage (K·V numbers for interleaved schedules). Default: balanced by
            forward+backward FLOPs from :mod:`gpipe.planner.cost`, measured on the first micro-batch.
        devices: one device per pipeline device (default: every CUDA device, else K × CPU).
        chunks: number of micro-batches M per mini-batch.
        micro_batch_size: alternatively (or also) the micro-batch size.
        batch_dim: the batch dimension of inputs and outputs.
        remat: ``"always"``, ``"except_last"`` (default) or ``"never"`` re-materialization.
        schedule: a schedule name (``gpipe``, ``1f1b``, ...: ``gpipe.schedules.available()``),
            ``"auto"`` (the planner's top configuration, :mod:`gpipe.core.auto`) or a
            :class:`gpipe.schedules.Schedule` built for this pipeline.
        virtual_stages: model chunks per device for the schedules of
            ``gpipe.schedules.interleaving()`` (default 2).
        seed: seed of the keyed random streams (dropout etc.).
        pinned: the first ``pinned`` layers run on stage 0 (the seed's ``before_tpl``).
        fetch: names of inner modules (as in ``named_modules()`` of ``module``) whose outputs
            are returned as extra outputs, merged along ``batch_dim`` (detached).
        timeout: seconds any stage waits for a boundary value before failing.
        threads_per_stage: intra-op threads per CPU worker (default: cores ÷ K).
        deferred_batch_norm: replace every BatchNorm by :class:`gpipe.nn.DeferredBatchNorm`
            so running statistics are updated once per mini-batch.
        check_finite: raise (naming the micro-batch) when a loss computed by ``step`` is NaN
            or infinite, before its backward runs. Off by default: it synchronizes on GPUs.
        sample: one example call of a module that is not a sequence: a tensor, a tuple, a
            dict of keywords or ``gpipe.capture.Sample(*args, **kwargs)``.
        split_points: module paths where the stages of a captured model are cut
            (``"<path>"`` before it, ``"<path>:after"`` after it; one string is one point).
            N points make N + 1 stages, which ``stages`` (x V) must agree with.

    After each call, ``last_events`` holds the timeline of its actions (seconds from the
    start of the step, which is ``last_events_t0`` on ``time.perf_counter``'s clock) and
    ``peak_live`` the most micro-batches each device held at once. On GPUs the times are
    the devices' own, read from CUDA events when ``last_events`` is first read after the
    call (waiting for that call's GPU work only then): a step itself never waits for the
    GPU to drain.
    """

    def __init__(
        self,
        module: nn.Module | Sequence[nn.Module],
        *,
        stages: int | None = None,
        balance: Sequence[int] | None = None,
        devices: Sequence[torch.device | str | int] | None = None,
        chunks: int | None = None,
        micro_batch_size: int | None = None,
        batch_dim: int = 0,
        remat: str = "except_last",
        schedule: str | Schedule = "gpipe",
        virtual_stages: int | None = None,
        seed: int = 0,
        pinned: int = 0,
        fetch: Sequence[str] = (),
        timeout: float = 300.0,
        threads_per_stage: int | None = None,
        deferred_batch_norm: bool = False,
        check_finite: bool = False,
        sample: Any = None,
        split_points: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        given = module
        module = sequence.front(
            module,
            sample=sample,
            split_points=split_points,
            batch_dim=batch_dim,
            deferred_batch_norm=deferred_batch_norm,
        )
        named = sequence.layers_of(module, "Pipe")
        self.layers = sequence.container(module, named)
        self.training = sequence.mode_of(given)  # the model's mode; its layers keep their own
        self._follow = sequence.Follower(given, self.layers)
        self._auto, self.auto_plan = Auto.of(schedule), None  # "auto": planned at the first batch
        self._auto_m = chunks is None and micro_batch_size is None  # the planner picks M too
        if self._auto is not None and balance is not None:
            raise ValueError("schedule='auto' chooses the balance too; drop balance=[...]")
        #: the checked options (schedule="auto": the planner's choice is in the attributes)
        self.options = opts = pipe_options(
            stages=stages,
            chunks=chunks,
            micro_batch_size=micro_batch_size,
            batch_dim=batch_dim,
            schedule="gpipe" if self._auto is not None else schedule,
            virtual_stages=virtual_stages,
            remat=remat,
            seed=seed,
            pinned=pinned,
            fetch=fetch,
            timeout=timeout,
            check_finite=check_finite,
            default_chunks=1,
        )
        self.chunks, self.micro_batch_size = opts.chunks, opts.micro_batch_size
        stages, self.pinned = opts.stages, opts.pinned
        if threads_per_stage is not None:
            threads_per_stage = options.count("threads_per_stage", threads_per_stage)
        self._deferred_bn = deferred_in(self.layers)
        for bn in self._deferred_bn:
            bn.chunks = self.chunks or 1  # until a step tells the real micro-batch count
        self.batch_dim, self.remat, self.seed = opts.batch_dim, opts.remat, opts.seed
        self.timeout = timeout = opts.timeout
        self.rng_step = 0
        self._timeline = Timeline([])
        self.last_events_t0 = 0.0  # perf_counter time the events are counted from
        self.peak_live: list[int] = []
        self.fetched: dict[str, Any] = {}

        self._spec = opts.schedule
        self.schedule_name = self._spec.name
        self.virtual_stages = v = self._spec.virtual_stages
        balance = plan.cut_by(
            module, balance, stages=stages, virtual_stages=v, auto=self._auto is not None
        )
        self.devices = pipe_devices(devices, stages, balance, self._spec.num_devices, v)
        self.num_devices = k = len(self.devices)
        #: stage -> device index (the schedule's placement)
        self.placement: tuple[int, ...] = self._spec.placement(k)
        if balance is not None:
            balance = plan.check_balance(balance, len(self.layers), k, v, self.pinned)
        else:
            balance_mod.check_stage_count(len(self.layers), k, v, self.pinned)
        self.check_finite = opts.check_finite
        self.fetch_names = list(opts.fetch)
        self._fetch_at = plan.fetch_points(named, self.fetch_names)
        self._balance: list[int] | None = balance
        self._stages: list[Stage] | None = None
        self._stage_flops: list[int] | None = None
        cpu_only = all(d.type == "cpu" for d in self.devices)
        if threads_per_stage is None and cpu_only:
            threads_per_stage = max(1, torch.get_num_threads() // k)
        self._runner = LocalRunner(self.devices, threads_per_stage if cpu_only else None, timeout)
        if balance is not None or k * v == 1:
            self._build([len(self.layers)] if balance is None else balance)

    # ----------------------------------------------------------------- sequence protocol

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int | slice) -> nn.Module:
        return self.layers[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    # ----------------------------------------------------------------- plan

    @property
    def balance(self) -> list[int] | None:
        """Layers per (virtual) stage, or ``None`` until the first call balances by FLOPs."""
        return None if self._balance is None else list(self._balance)

    @property
    def partitions(self) -> list[Partition]:
        """Which layers sit on which stage and device, with their parameter counts."""
        if self._stages is None:
            raise RuntimeError(
                "the pipeline is not partitioned yet: it balances by FLOPs on the first call; "
                "call it once, or pass balance=[...]"
            )
        return partitions(self._stages, list(self.layers._modules), self._stage_flops)

    def _device_of_stage(self, stage: int) -> torch.device:
        return self.devices[self.placement[stage]]

    def _build(self, balance: list[int]) -> None:
        self._balance = list(balance)
        named = list(self.layers._modules.items())
        plan.check_shared_placement(
            named, balance, [self._device_of_stage(s) for s in range(len(balance))]
        )
        self._stages = plan.build_stages(
            named,
            balance,
            self.num_devices,
            self._device_of_stage,
            remat=self.remat,
            seed=self.seed,
            fetch_at=self._fetch_at,
        )
        shared_params.lend(self._stages, self.placement)
        self._runner.start()

    def _ensure_built(self, sample_microbatch: tuple) -> None:
        if self._stages is not None:
            return
        counts, self._stage_flops = plan.auto_balance(
            list(self.layers),
            sample_microbatch,
            self.num_devices * self.virtual_stages,
            pinned=self.pinned,
            train=self.training,
        )
        self._build(counts)

    @classmethod
    def from_configuration(
        cls, module: nn.Module | Sequence[nn.Module], configuration: Any, *, devices: Any = None
    ) -> Pipe:
        """A pipe over ``module`` in one of the planner's configurations
        (:class:`gpipe.planner.autoplan.Configuration`: balance, M, schedule, V, remat) on
        ``devices`` (default: the pipe's)."""
        c = configuration
        return cls(
            module,
            balance=list(c.balance),
            chunks=c.chunks,
            schedule=c.schedule,
            virtual_stages=c.virtual_stages,
            remat=c.remat,
            devices=devices,
        )

    def _take_plan(self, inputs: tuple, step: tuple | None) -> None:
        """``schedule="auto"``: take the planner's top configuration for this batch (or, with
        ``Auto(tune=N)``, the fastest of its top N timed on ``step``: the arguments of
        :meth:`step`), build it."""
        leaves = [v for _, v in tree_flatten(inputs)[0] if isinstance(v, torch.Tensor) and v.dim()]
        rows = leaves[0].shape[self.batch_dim]
        m = None if self._auto_m else self.chunks or -(-rows // self.micro_batch_size)
        ranked = self._auto.rank(
            self.layers,
            inputs,
            self.devices,
            chunks=m,
            batch_rows=rows,
            pinned=self.pinned,
            stepping=step is not None,
        )
        top = ranked[0]
        if self._auto.tune:
            assert step is not None
            given, targets, loss_fn, reduction = step
            build = partial(type(self).from_configuration, self.layers, devices=self.devices)
            self._auto.measured = race(
                self.layers,
                ranked,
                given,
                targets,
                loss_fn,
                build=build,
                top=self._auto.tune,
                steps=self._auto.tune_steps,
                reduction=reduction,
            )
            top = self._auto.measured[0].configuration
        self.auto_plan, self.remat = top, top.remat
        self._spec = ScheduleSpec(top.schedule, top.virtual_stages)
        self.schedule_name, self.virtual_stages = self._spec.name, self._spec.virtual_stages
        self.placement = self._spec.placement(self.num_devices)
        if self._auto_m:
            self.chunks = top.chunks
        self._build(list(top.balance))

    def _schedule(self, m: int) -> Schedule:
        return self._spec.get(self.num_devices, m)

    @property
    def last_events(self) -> list[Event]:
        """The last call's timeline (see the class docstring); on GPUs its first read waits
        for that call's events to complete, unless they already have."""
        return self._timeline.resolved()

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and remove hooks (``with Pipe(...) as pipe:`` closes it at
        the end, as ``DistributedPipe`` does). The module's layers stay usable."""
        self._runner.close()
        for st in self._stages or []:
            st.close()

    # ----------------------------------------------------------------- running

    def _split(self, obj: Any, step: tuple | None = None) -> list[Any]:
        if self._auto is not None and self._stages is None:
            self._take_plan(obj, step)
        return split(
            obj, self.chunks, micro_batch_size=self.micro_batch_size, batch_dim=self.batch_dim
        )

    def _begin(
        self, m: int, grad: bool, loss_fn: Callable | None = None, scale: Any = 1.0
    ) -> list[StepState]:
        """Give every stage a fresh step state (random-stream step, saved activations)."""
        assert self._stages is not None
        step = self.rng_step
        if self.training:
            self.rng_step += 1
            for bn in self._deferred_bn:  # statistics over this step's m micro-batches
                bn.begin_step(m)
        return stepcore.begin(
            self._stages, step, m, grad, loss_fn, scale, check_finite=self.check_finite
        )

    def _execute(
        self,
        per_device: Sequence[Sequence[Any]],
        data: StepData,
        state: ThreadState | None = None,
    ) -> None:
        assert self._stages is not None
        try:
            self._runner.run(self._stages, per_device, data, state, self.placement)
        finally:
            self._timeline = Timeline.of(data)  # read when asked: the step never waits
            self.last_events_t0 = data.t0
            self.peak_live = [data.peak_live.get(d, 0) for d in range(self.num_devices)]

    def _finish_forward(self, data: StepData, m: int) -> None:
        """Check the outputs' rows and collect the fetched activations."""
        stepcore.check_output_rows(data.outputs, data.inputs, m, self.batch_dim)
        self.fetched = stepcore.collect_fetched(data.fetched, self.fetch_names, m, self.batch_dim)

    def _run_backward(
        self,
        per_device: Sequence[Sequence[Any]],
        data: StepData,
        states: list[StepState],
        thread_state: ThreadState,
    ) -> None:
        """The backward actions of an earlier ``pipe(x)``, on that call's own step states
        (a recompute repeats the forward exactly, under the forward's autocast)."""
        assert self._stages is not None
        with self._runner.owned("the backward of pipe(x)"):
            for st, state in zip(self._stages, states, strict=True):
                st.state = state
            self._execute(per_device, data, thread_state)
            shared_params.flush(self._stages, states)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Pipelined forward of the mini-batch ``inputs``; ``.backward()`` on a loss of the
        result runs the pipelined backward. With ``fetch``, returns ``(output, fetched)``.

        Each call keeps its own state until its backward, so several forwards may precede one
        backward (as with a plain module)."""
        refuse_compiling("pipe(x)")
        self._follow("the pipe")
        inputs = sequence.bind_inputs(self.layers, inputs, kwargs)
        with self._runner.owned("pipe(x)"):
            mbs = self._split(inputs)
            m = len(mbs)
            self._ensure_built(mbs[0])
            needs_grad = needs_grad_of(self.parameters(), inputs)
            sched = self._schedule(m)
            if needs_grad and not sched.forward_backward_separable:
                raise RuntimeError(
                    f"schedule {sched.name!r} interleaves forward and backward, so it needs the "
                    "loss inside the pipeline: use loss = pipe.step(inputs, targets, loss_fn) "
                    "instead of pipe(inputs) + loss.backward() (or run pipe(inputs) under "
                    "torch.no_grad())"
                )
            data = StepData(
                self.num_devices * self.virtual_stages,
                inputs=mbs,
                splits=sched.splits,
            )
            states = self._begin(m, needs_grad)
            self._execute(sched.forward_part(), data)
            self._finish_forward(data, m)
            run = Run(
                self._run_backward,
                [p for p in self.parameters() if p.requires_grad],
                self.batch_dim,
                sched,
                data,
                inputs,
                states if needs_grad else [],
            )
            out = run.wrap() if needs_grad else run.output
            return (out, self.fetched) if self.fetch_names else out

    def step(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """One pipelined forward+backward with the loss computed inside the last stage.

        ``loss_fn(output_microbatch, target_microbatch)`` returns a scalar. With
        ``reduction="mean"`` (for a loss that averages over its micro-batch) each micro-batch's
        loss is divided by M, so the returned loss and the gradients equal those of the whole
        mini-batch; with ``"sum"`` they are added; with a callable ``count(targets)`` (a mean
        over the items it counts, e.g. :func:`gpipe.count_items` for ``ignore_index``) each is
        weighted by its share of the items (:mod:`gpipe.core.reduction`). Gradients accumulate in ``.grad`` (call
        ``zero_grad`` as usual), and in the inputs' ``.grad`` (or their graph) for inputs that
        require grad, as ``loss.backward()`` would. Under ``torch.no_grad()`` only the forward
        runs (evaluation). Calls from several threads run one after the other.
        """
        refuse_compiling("pipe.step")
        stepcore.check_call(loss_fn, reduction)
        self._follow("the pipe")
        given, inputs = inputs, sequence.step_inputs(self.layers, inputs)
        with self._runner.owned("pipe.step"):
            mbs = self._split(inputs, (given, targets, loss_fn, reduction))
            m = len(mbs)
            stepcore.check_targets(inputs, targets, self.batch_dim)
            tmbs = [None] * m if targets is None else split(targets, m, batch_dim=self.batch_dim)
            scales = stepcore.loss_scales(reduction, tmbs)[0]
            self._ensure_built(mbs[0])
            grad = torch.is_grad_enabled()
            sched = self._schedule(m)
            data = StepData(
                self.num_devices * self.virtual_stages,
                inputs=mbs,
                targets=tmbs,
                splits=sched.splits,
                keep_outputs=False,
            )
            states = self._begin(m, grad, loss_fn, scales)
            self._execute(stepcore.step_actions(sched, grad), data)
            shared_params.flush(self._stages, states)
            self._finish_forward(data, m)
            if grad:
                with amp.off():  # a backward, as the pipe's own (the caller may be in a region)
                    backward_into_inputs(data.input_grads, inputs, m, self.batch_dim)
            return stepcore.total_loss(data.losses, m)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of every stage to ``max_norm`` as
        ``torch.nn.utils.clip_grad_norm_`` does on the un-pipelined model (a parameter held by
        several layers counts once), with the same arithmetic as
        :meth:`gpipe.DistributedPipe.clip_grad_norm_` (:mod:`gpipe.core.clip`); returns the norm."""
        params = list(self.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        total = clip.clip_grad_norm_(
            grads, grads, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite
        )
        return total.to(grads[0].dtype if grads else torch.float32)

    def extra_repr(self) -> str:
        return (
            f"stages={self.num_devices}, virtual_stages={self.virtual_stages}, "
            f"chunks={self.chunks}, schedule={self.schedule_name!r}, remat={self.remat!r}"
        )
