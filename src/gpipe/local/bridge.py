"""The autograd bridge behind ``loss_fn(pipe(x), y).backward()``.

``pipe(x)`` runs the schedule's forward actions and returns outputs that hang off one custom
autograd node; when autograd reaches that node, :meth:`Run.backward` runs the schedule's
backward actions with the output gradients autograd hands it, and returns the input gradients.

The invariant: the bridge sends gradients exactly where plain autograd would, or refuses.

* Each ``pipe(x)`` call is its own :class:`Run`, holding every stage's
  :class:`~gpipe.stage.stage.StepState` (random-stream step, saved activations) until its backward,
  so two forwards before one backward differentiate what each forward ran.
* The pipe's trainable parameters are inputs of the node (their gradient is ``None`` there:
  the stages accumulate into ``.grad`` themselves). That lets the backward ask autograd which
  of them the current ``backward``/``autograd.grad`` call wants: all (``loss.backward()``), or
  none (``torch.autograd.grad(loss, x)``, ``backward(inputs=[x])``: then only input gradients
  are computed and no ``.grad`` is touched). A call that wants some parameters but not others,
  or a double backward (``create_graph=True``), is refused with an error saying what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from gpipe.base.microbatch import merge, split, tree_flatten, tree_wants_grad
from gpipe.local.workers import ThreadState

if TYPE_CHECKING:
    from gpipe.core.executor import StepData
    from gpipe.schedules import Schedule
    from gpipe.stage.stage import StepState

__all__ = ["Run", "backward_into_inputs", "merge_input_grads", "needs_grad_of"]


class _Bridge(torch.autograd.Function):
    """Connects ``pipe(x)``'s outputs to the pipelined backward."""

    @staticmethod
    def forward(ctx: Any, run: Run, *inputs: torch.Tensor) -> Any:
        ctx.run = run
        ctx.set_materialize_grads(False)
        outs = run.output_leaves
        nondiff = [t for t in outs if not (t.is_floating_point() or t.is_complex())]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        run: Run = ctx.run
        input_grads = run.backward(list(grads))
        return (None, *input_grads, *([None] * len(run.params)))


def merge_input_grads(
    per_microbatch: list[Any], inputs: Any, batch_dim: int
) -> list[torch.Tensor | None]:
    """The gradient of each tensor leaf of ``inputs`` that requires grad, merged over the
    micro-batches' input gradients (``per_microbatch[i]`` shaped like micro-batch ``i``'s
    inputs); a micro-batch that sent no gradient for a leaf contributes zeros."""
    m = len(per_microbatch)
    leaves = tree_flatten(inputs)[0]
    per_mb = [tree_flatten(g)[0] for g in per_microbatch]
    for i, flat in enumerate(per_mb):
        if len(flat) != len(leaves):
            raise RuntimeError(
                f"micro-batch {i}'s input gradient has {len(flat)} leaves but the inputs have "
                f"{len(leaves)}"
            )
    out: list[torch.Tensor | None] = []
    for pos, (_, leaf) in enumerate(leaves):
        if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
            continue
        parts = [per_mb[i][pos][1] for i in range(m)]
        if all(p is None for p in parts):
            out.append(None)
            continue
        pieces = split(leaf.detach(), m, batch_dim=batch_dim)
        filled = [p if p is not None else torch.zeros_like(pieces[i]) for i, p in enumerate(parts)]
        out.append(torch.cat([f.to(leaf.device) for f in filled], dim=batch_dim))
    return out


def backward_into_inputs(
    input_grads: dict[int, Any], inputs: Any, num_microbatches: int, batch_dim: int
) -> None:
    """Send a step's input gradients (``input_grads[i]`` of micro-batch ``i``) on to the
    tensors of ``inputs`` that require grad: into ``.grad`` of a leaf, through the graph of a
    tensor computed before the pipe — as ``loss.backward()`` would."""
    wanting = [
        v for _, v in tree_flatten(inputs)[0] if isinstance(v, torch.Tensor) and v.requires_grad
    ]
    if not wanting:
        return
    per_mb = [input_grads[i] for i in range(num_microbatches)]
    grads = merge_input_grads(per_mb, inputs, batch_dim)
    pairs = [(t, g) for t, g in zip(wanting, grads, strict=True) if g is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


class Run:
    """State of one ``pipe(x)`` call between its forward and its backward."""

    def __init__(
        self,
        run_backward: Callable[[Any, StepData, list[StepState], ThreadState], None],
        params: list[torch.Tensor],
        batch_dim: int,
        schedule: Schedule,
        data: StepData,
        inputs: Any,
        states: list[StepState],
    ) -> None:
        self.thread_state = ThreadState()  # the forward's grad mode
        self.run_backward, self.batch_dim = run_backward, batch_dim
        self.schedule = schedule
        self.data = data
        self.inputs = inputs
        self.states = states
        m = schedule.num_microbatches
        self.output = merge([data.outputs[i] for i in range(m)], batch_dim=batch_dim)
        leaves, self.rebuild_output = tree_flatten(self.output)
        self.output_paths = [(p, isinstance(v, torch.Tensor)) for p, v in leaves]
        self.output_leaves = [v for _, v in leaves if isinstance(v, torch.Tensor)]
        self.non_tensor_outputs = [v for _, v in leaves if not isinstance(v, torch.Tensor)]
        self.input_leaves = [
            v for _, v in tree_flatten(inputs)[0] if isinstance(v, torch.Tensor) and v.requires_grad
        ]
        self.params = params  # the pipe's trainable parameters
        self.param_nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in self.params]
        self.done = False

    def wrap(self) -> Any:
        """The outputs as autograd sees them: hanging off the bridge node."""
        # something here requires grad (else pipe(x) would not wrap): the outputs do too
        outs = _Bridge.apply(self, *self.input_leaves, *self.params)
        it_t, it_o = iter(outs), iter(self.non_tensor_outputs)
        return self.rebuild_output(
            [next(it_t) if is_t else next(it_o) for _, is_t in self.output_paths]
        )

    def _wants_parameters(self) -> bool:
        """Whether the running backward wants the parameters' gradients (all or none)."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward through a Pipe (create_graph=True) is not supported: the "
                "pipelined backward does not build a graph of itself; compute gradient "
                "penalties on an un-pipelined copy of the model"
            )
        wanted = [bool(torch._C._will_engine_execute_node(n)) for n in self.param_nodes]
        if all(wanted):
            return True
        if not any(wanted):
            return False
        raise RuntimeError(
            f"this backward asks for the gradients of {sum(wanted)} of the pipe's "
            f"{len(wanted)} trainable parameters; the pipeline computes all of them or none. "
            "Use loss.backward() (all, into .grad) or torch.autograd.grad(loss, inputs) "
            "(inputs only), or freeze the others with requires_grad_(False)"
        )

    def backward(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        if self.done:
            raise RuntimeError(
                "the pipeline's backward ran twice for one forward; call pipe(x) again "
                "(retain_graph is not supported)"
            )
        with_params = self._wants_parameters()
        self.done = True
        m = self.schedule.num_microbatches
        it = iter(grads)
        full = [next(it) if is_t else None for _, is_t in self.output_paths]
        if all(g is None for g in full):
            return [None] * len(self.input_leaves)
        self.data.grad_outputs = split(self.rebuild_output(full), m, batch_dim=self.batch_dim)
        part = self.schedule.backward_part()
        if not with_params:  # input gradients only: B split from W, and no W
            self.data.splits = lambda stage, microbatch: True
            part = tuple(tuple(a for a in acts if a.kind != "W") for acts in part)
        self.run_backward(part, self.data, self.states, self.thread_state)
        self.states = []
        per_mb = [self.data.input_grads[i] for i in range(m)]
        return merge_input_grads(per_mb, self.inputs, self.batch_dim)


def needs_grad_of(parameters: Iterable[torch.Tensor], inputs: Any) -> bool:
    """Whether ``pipe(inputs)`` builds a graph (a :class:`Run` to differentiate): grad mode
    on, and a trainable parameter (of the pipe's ``parameters``) or an input that requires
    grad."""
    return torch.is_grad_enabled() and (
        any(p.requires_grad for p in parameters) or tree_wants_grad(inputs)
    )
