"""One partition of the model on one device: forward and backward of single micro-batches.

A :class:`Stage` owns a contiguous run of layers and, per micro-batch in flight, only what its
re-materialization mode needs: the boundary input always; the autograd graph only when the
micro-batch is not re-materialized. The invariant: after ``forward(m)`` and then ``backward(m)``
(or ``backward(m)`` + ``backward_weight(m)`` for split schedules) the parameters' ``.grad`` hold
this micro-batch's contribution added to what was there (a parameter borrowed from a stage
on another worker: its step alias's, added at the step's end by
:func:`gpipe.stage.shared_params.flush`), and nothing of micro-batch ``m`` is kept. Random ops run
inside :func:`gpipe.stage.rng.keyed` regions keyed by (seed, step, micro-batch, layer), so a
recompute draws exactly what the first forward drew, and it leaves every buffer the forward
updated in place as it found it (:class:`gpipe.stage.remat.SideEffects`: BatchNorm's statistics).
Forwards and recomputes run under the autocast state the step began with, backwards without
autocast (:mod:`gpipe.stage.amp`), on whichever thread runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gpipe.base.microbatch import tree_detach, tree_flatten, tree_wants_grad
from gpipe.stage import amp, inplace, rng, rng_replay, shared_params, wgrad
from gpipe.stage import remat as remat_mod
from gpipe.stage.loss import checked_loss, zero_loss
from gpipe.stage.state import SavedMicrobatch, StageOutput, StepState

__all__ = ["Stage", "StageOutput", "StepState"]


def _leaves(obj: Any) -> list[Any]:
    return [v for _, v in tree_flatten(obj)[0]]


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class Stage:
    """Layers ``layers`` (pairs of global layer index and module) on ``device``.

    ``is_first``: the stage's first layer receives the user's positional inputs unpacked (as
    ``nn.Sequential`` would for its first layer); ``fetch`` maps names to inner modules whose
    outputs are collected per micro-batch (the seed's ``act_fetch_layers``).
    """

    def __init__(
        self,
        index: int,
        layers: Sequence[tuple[int, nn.Module]],
        device: torch.device,
        *,
        is_first: bool,
        is_last: bool,
        remat: str = "except_last",
        seed: int = 0,
        fetch: dict[str, nn.Module] | None = None,
        rng_offset: int = 0,
    ) -> None:
        if not layers:
            raise ValueError(f"stage {index} has no layers")
        self.index = index
        self.layers = list(layers)
        self.device = torch.device(device)
        self.is_first = is_first
        self.is_last = is_last
        self.remat = remat_mod.check_mode(remat)
        self.seed = seed
        # added to the micro-batch index in random-stream keys: a data-parallel replica j of
        # M micro-batches draws as micro-batches j·M .. j·M+M-1 of the whole batch
        self.rng_offset = rng_offset
        self.check_finite = False
        self.state = StepState()
        # per (layer, training, captured graph): "full" (keyed mode around the whole layer), "modules" (only
        # inside hooked dropout modules) or "none"; unknown until the layer's first run.
        self._random: dict[tuple[int, bool, Any], str] = {}
        self._sink: dict[str, Any] | None = None
        self._hooks = []
        rng.warm_up()
        for idx, layer in self.layers:
            self._hooks.extend(rng.install_hooks(layer, idx, rng_replay.replay))
        for name, module in (fetch or {}).items():
            self._hooks.append(module.register_forward_hook(self._fetch_hook(name)))
        self._wgrad = wgrad.WeightGrads(m for _, layer in self.layers for m in layer.modules())
        self._effects = remat_mod.SideEffects(layer for _, layer in self.layers)
        self._inputs = inplace.Inputs(layer for _, layer in self.layers)
        # parameters an earlier stage on another worker owns (:func:`gpipe.stage.shared_params.lend`)
        self.loan = shared_params.Loan()

    # ----------------------------------------------------------------- bookkeeping

    def parameters(self) -> list[nn.Parameter]:
        """Distinct parameters of this stage's layers."""
        seen: dict[int, nn.Parameter] = {}
        for _, layer in self.layers:
            for p in layer.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def fallback_parameters(self) -> list[str]:
        """Names (``<layer index>.<name>``) of the trainable parameters whose deferred weight
        gradient comes from the autograd graph kept from ``B`` to ``W`` rather than from
        :mod:`gpipe.stage.wgrad` (parameters of modules other than the standard ones)."""
        fallback = {id(p) for p in self._wgrad.fallback(self.parameters())}
        names: dict[int, str] = {}
        for idx, layer in self.layers:
            for name, p in layer.named_parameters():
                if id(p) in fallback:
                    names.setdefault(id(p), f"{idx}.{name}")
        return list(names.values())

    def begin_step(
        self,
        step: int,
        num_microbatches: int,
        grad_mode: bool,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        loss_scale: float | Sequence[float] = 1.0,
        autocast: amp.Autocast | None = None,
    ) -> StepState:
        """Start a step with a fresh :class:`StepState` and return it.

        ``autocast``: the state its forwards run under (default: this thread's, now). The
        previous state is left to whoever holds it (an unfinished ``pipe(x)`` keeps its
        own); a worker abandoned in an earlier step writes into that old state, never this one.
        """
        autocast = autocast or amp.Autocast.capture()
        self.state = StepState(
            step, num_microbatches, grad_mode, loss_fn, loss_scale, autocast=autocast
        )
        if grad_mode and self.loan.borrowed:
            self.state.aliases = self.loan.aliases()
        return self.state

    def close(self) -> None:
        """Remove the hooks this stage put on the model and drop saved state."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._wgrad.close()
        self.loan.close()
        self.state = StepState()

    @property
    def pending(self) -> list[int]:
        """Micro-batches of the current step whose state is still held."""
        return list(self.state.saved)

    def _fetch_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._sink is not None and not remat_mod.is_recomputing():
                self._sink[name] = tree_detach(output)

        return hook

    # ----------------------------------------------------------------- running layers

    def _run(self, state: StepState, microbatch: int, x: Any) -> Any:
        microbatch += self.rng_offset
        with self.loan.view(state.aliases):  # a borrowed parameter reads its alias
            for pos, (idx, layer) in enumerate(self.layers):
                unpack = self.is_first and pos == 0
                key = (idx, layer.training, getattr(layer, "graph_key", None))
                how = self._random.get(key)
                if how is None or how == "full":
                    with rng.keyed(self.seed, state.step, microbatch, idx) as mode:
                        x = layer(*x) if unpack else layer(x)
                    if how is None:
                        used = "modules" if mode.used else "none"
                        self._random[key] = "full" if mode.used_outside_known else used
                elif how == "modules":
                    with rng.keyed_modules(self.seed, state.step, microbatch, idx):
                        x = layer(*x) if unpack else layer(x)
                else:
                    x = layer(*x) if unpack else layer(x)
        return x

    def _prepare(self, state: StepState, x: Any) -> Any:
        leaves, rebuild = tree_flatten(x)
        out = []
        for _, v in leaves:
            if isinstance(v, torch.Tensor):
                t = v.detach()
                if t.device != self.device:
                    t = t.to(self.device)
                # A boundary tensor from another stage may have been computed under no_grad
                # (re-materialization), so its flag says nothing: differentiate every float
                # boundary tensor. The user's own inputs keep their requires_grad.
                wants = v.requires_grad if self.is_first else True
                if state.grad_mode and wants and _differentiable(t):
                    t.requires_grad_(True)
                out.append(t)
            else:
                out.append(v)
        return rebuild(out)

    def _loss(self, state: StepState, microbatch: int, out: Any, target: Any) -> torch.Tensor:
        assert state.loss_fn is not None
        scale = state.loss_scale
        scale = scale if isinstance(scale, float | int) else scale[microbatch]
        if scale == 0:  # a micro-batch without items (gpipe.core.reduction): it adds nothing
            return zero_loss(out, self.device)
        loss = checked_loss(state.loss_fn, out, target, microbatch, self.check_finite)
        return loss * scale

    # ----------------------------------------------------------------- actions

    def forward(
        self, microbatch: int, x: Any, target: Any = None, *, split: bool = False
    ) -> StageOutput:
        """Run micro-batch ``microbatch`` forward; keep what backward needs.

        ``split``: a split backward (``B`` then ``W``) will follow, so the standard modules'
        calls are captured for a weight gradient without the graph (:mod:`gpipe.stage.wgrad`). The
        layers and the loss run under the step's autocast (:mod:`gpipe.stage.amp`).
        """
        with self.state.autocast.forward():
            return self._forward(microbatch, x, target, split)

    def _forward(self, microbatch: int, x: Any, target: Any, split: bool) -> StageOutput:
        state = self.state
        if microbatch in state.saved:
            raise RuntimeError(f"stage {self.index}: micro-batch {microbatch} ran forward twice")
        inputs = self._prepare(state, x)
        want_loss = self.is_last and state.loss_fn is not None
        if want_loss and target is not None:
            target = _to_device(target, self.device)  # the loss runs where the outputs are
        self._sink = {}
        try:
            if not state.grad_mode:
                with torch.no_grad():
                    out = self._run(state, microbatch, inputs)
                    loss = self._loss(state, microbatch, out, target) if want_loss else None
                return StageOutput(out, loss, self._sink)
            remat = remat_mod.should_remat(self.remat, microbatch, state.num_microbatches)
            capture = split and not remat and tree_wants_grad(inputs)

            def attempt(fed: Any) -> tuple:
                draws: dict = {}
                with (
                    torch.set_grad_enabled(not remat),
                    self._capture(capture) as calls,
                    self._effects.watch(),
                    rng.recording(draws),
                ):
                    out = self._run(state, microbatch, fed)
                    loss = self._loss(state, microbatch, out, target) if want_loss else None
                return out, loss, calls, draws

            out, loss, calls, draws = self._inputs.run(
                attempt, inputs, remat, self.index, microbatch
            )
            fetched = self._sink
        finally:
            self._sink = None
        keep = None if remat else (loss if want_loss else out)
        # an abandoned worker of an earlier step writes into that step's state, never this one
        state.saved[microbatch] = SavedMicrobatch(
            inputs, keep, remat, target, calls=calls, draws=draws
        )
        return StageOutput(out, loss, fetched)

    def _capture(self, on: bool) -> Any:
        """Capture the standard modules' calls inside the body when ``on`` (else a no-op
        yielding ``None``).

        Only a split backward of a stage whose inputs want a gradient captures: when none
        does (the first stage, on token ids) ``B`` has nothing to compute and leaves the
        whole backward, one walk of the graph, to ``W``.
        """
        return self._wgrad.capture() if on else contextlib.nullcontext()

    def _outputs_for_backward(
        self, state: StepState, microbatch: int, saved: SavedMicrobatch, split: bool
    ) -> Any:
        if not saved.remat:
            return saved.outputs
        capture = split and tree_wants_grad(saved.inputs)
        with (
            state.autocast.forward(),  # a forward: the step's autocast, inside a backward
            torch.enable_grad(),
            remat_mod.recomputing(),
            self._capture(capture) as calls,
            self._effects.undone(),  # BatchNorm's statistics take each micro-batch once
        ):
            saved.calls = calls
            out = self._run(state, microbatch, self._inputs.fed(saved.inputs))
            if self.is_last and state.loss_fn is not None:
                return self._loss(state, microbatch, out, saved.target)
        return out

    def _backward_of(self, microbatch: int) -> Any:
        """The random-stream guard of a backward action (:func:`gpipe.stage.rng_replay.backward_of`)."""
        full = any(how == "full" for how in self._random.values())
        saved = self.state.saved.get(microbatch)
        draws = saved.draws if saved is not None else None
        return rng_replay.backward_of(self.index, microbatch, full, draws, self.device)

    def backward(self, microbatch: int, grad: Any, *, split: bool = False) -> Any:
        """Backward of ``microbatch`` given the gradient of its outputs.

        ``grad`` is a pytree shaped like the stage's output (``None`` leaves for outputs that
        got no gradient), or ``None`` on the last stage when it computed the loss. Returns the
        gradient of the stage's input pytree. With ``split=True`` only the input gradient is
        computed now; the weight gradient waits for :meth:`backward_weight`. Runs without
        autocast (:mod:`gpipe.stage.amp`), as a backward outside the forward's region does.
        """
        with amp.off(), self._backward_of(microbatch):
            return self._backward(microbatch, grad, split)

    def _backward(self, microbatch: int, grad: Any, split: bool) -> Any:
        state = self.state
        saved = state.saved.get(microbatch)
        if saved is None:
            raise RuntimeError(
                f"stage {self.index}: backward of micro-batch {microbatch} without its forward"
            )
        if not split and saved.calls is not None:  # captured for W: run both halves now
            gin = self.backward(microbatch, grad, split=True)
            self.backward_weight(microbatch)
            return gin
        out = self._outputs_for_backward(state, microbatch, saved, split)
        if self.is_last and state.loss_fn is not None:
            outs = [out] if out.requires_grad else []
            grads: list[torch.Tensor | None] = [None] * len(outs)
        else:
            out_leaves = _leaves(out)
            grad_leaves = _leaves(grad) if grad is not None else [None] * len(out_leaves)
            if len(grad_leaves) != len(out_leaves):
                raise RuntimeError(
                    f"stage {self.index}: micro-batch {microbatch} output has {len(out_leaves)} "
                    f"leaves but its gradient has {len(grad_leaves)}"
                )
            outs, grads = [], []
            for o, g in zip(out_leaves, grad_leaves):
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                    outs.append(o)
                    grads.append(g.to(o.device) if g.device != o.device else g)
        in_leaves, rebuild = tree_flatten(saved.inputs)
        needs = [v for _, v in in_leaves if isinstance(v, torch.Tensor) and v.requires_grad]
        if not split:
            if outs:
                torch.autograd.backward(outs, grads)
            del state.saved[microbatch]
            return rebuild(
                [
                    v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None
                    for _, v in in_leaves
                ]
            )
        got: dict[int, torch.Tensor | None] = {}
        if saved.calls is not None:
            saved.calls.check_inputs(self.index, microbatch)
            params = self.parameters()
            res, kept = self._wgrad.input_grads(
                saved.calls, outs, grads, needs, params, state.aliases
            )
            got = {id(v): g for v, g in zip(needs, res)}
            # the graph stays only for parameters outside the standard modules
            saved.out_tensors, saved.out_grads = (outs, grads) if kept else ([], [])
            saved.outputs = saved.inputs = None
            return rebuild(
                [got.get(id(v)) if isinstance(v, torch.Tensor) else None for _, v in in_leaves]
            )
        if outs and needs:
            res = torch.autograd.grad(outs, needs, grads, retain_graph=True, allow_unused=True)
            got = {id(v): g for v, g in zip(needs, res)}
        saved.out_tensors, saved.out_grads = outs, grads
        saved.outputs = None
        return rebuild(
            [got.get(id(v)) if isinstance(v, torch.Tensor) else None for _, v in in_leaves]
        )

    def backward_weight(self, microbatch: int) -> None:
        """The deferred weight-gradient half of a split backward for ``microbatch``,
        without autocast (:mod:`gpipe.stage.amp`)."""
        with amp.off(), self._backward_of(microbatch):
            self._backward_weight(microbatch)

    def _backward_weight(self, microbatch: int) -> None:
        saved = self.state.saved.pop(microbatch, None)
        if saved is None or saved.out_tensors is None:
            raise RuntimeError(
                f"stage {self.index}: weight-gradient of micro-batch {microbatch} before its "
                "input-gradient"
            )
        if saved.calls is not None:
            self._wgrad.accumulate(saved.calls)
            params = self._wgrad.graph_params(self.parameters())
        else:
            params = [p for p in self.parameters() if p.requires_grad]
        outs = saved.out_tensors
        if outs and params:
            inputs = shared_params.targets(params, self.state.aliases)
            torch.autograd.backward(outs, saved.out_grads, inputs=inputs)


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor leaf on ``device`` (a copy only where it is elsewhere)."""
    leaves, rebuild = tree_flatten(obj)
    return rebuild(
        [
            # non-blocking only towards a GPU: a copy to the CPU must be complete when read
            v.to(device, non_blocking=device.type == "cuda")
            if isinstance(v, torch.Tensor) and v.device != device
            else v
            for _, v in leaves
        ]
    )
