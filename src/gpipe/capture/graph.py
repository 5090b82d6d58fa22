"""Capture a module's forward as one flat graph: ``torch.export`` first, ``torch.fx`` second.

:func:`trace` returns a :class:`Traced`: an ``fx.Graph`` whose placeholders are the user's
inputs (in the order :meth:`Traced.bind` flattens a call's arguments), whose ``get_attr``
nodes name the model's own parameters and buffers by their paths in the model (never copies),
and whose output is the flat list of the model's output leaves, rebuilt by ``out_spec``.

Export's lifted parameters are turned back into ``get_attr`` nodes; its lifted constants are
kept in ``constants``; ``aten.dropout`` becomes a call of an ``nn.Dropout`` module (so the
keyed random streams see a known random module) and a fused attention traced with dropout an
:class:`AttentionDropout`, so the graph follows ``train()``/``eval()``.

The invariant: running the graph with the model's parameters computes, op for op, what
``model(*args, **kwargs)`` computes for inputs of the sample's structure. Where neither tracer
gives such a graph, :func:`trace` raises one :class:`CaptureError` naming both failures.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["CaptureError", "Traced", "trace"]

_aten = torch.ops.aten


class CaptureError(RuntimeError):
    """The model could not be captured as a graph (each tracer's reason is in the message)."""


@dataclass
class Traced:
    """A captured forward: the graph, how a call's arguments map to its placeholders and how
    its flat outputs rebuild the model's output."""

    graph: fx.Graph
    method: str  # "export" or "fx"
    bind: Callable[[tuple, dict], tuple]
    out_spec: pytree.TreeSpec
    constants: dict[str, Any] = field(default_factory=dict)  # get_attr target -> tensor/module
    static_batch: int | None = None  # the batch size export fixed, where it could not vary


def _shapes(leaves: list, batch_dim: int) -> list[tuple | None]:
    """Each tensor leaf's shape with the batch dimension left out (``None``: not a tensor)."""
    return [
        (v.dim(), *[s for d, s in enumerate(v.shape) if d != batch_dim])
        if isinstance(v, torch.Tensor)
        else None
        for v in leaves
    ]


def _flat_bind(
    in_spec: pytree.TreeSpec, n_inputs: int, shapes: list[tuple | None], batch_dim: int
) -> Callable[[tuple, dict], tuple]:
    def bind(args: tuple, kwargs: dict) -> tuple:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != in_spec:
            raise TypeError(
                "the pipe was captured for calls shaped like its sample, "
                f"{_describe(in_spec)}, but got {_describe(spec)}; call it with the same "
                "positional and keyword arguments as sample= (values may differ)"
            )
        if len(leaves) != n_inputs:  # pragma: no cover - export's own contract
            raise TypeError(f"expected {n_inputs} input leaves, got {len(leaves)}")
        for i, (want, got) in enumerate(zip(shapes, _shapes(leaves, batch_dim))):
            if want is not None and got is not None and want != got:
                raise ValueError(
                    f"input {i} has shape {tuple(leaves[i].shape)}, but the model was captured "
                    f"on a sample whose input {i} has {want[0]} dims and sizes {list(want[1:])} "
                    f"outside batch_dim={batch_dim}; only the batch dimension may change — "
                    "capture again on a sample of this shape"
                )
        return tuple(leaves)

    return bind


def _describe(spec: pytree.TreeSpec) -> str:
    try:
        args, kwargs = spec.children()
        kw = list(kwargs.context) if kwargs.context else []
        return f"{args.num_children} positional argument(s) and keyword(s) {kw}"
    except Exception:  # pragma: no cover - defensive
        return str(spec)


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> Any:
    """Every tensor input's batch dimension marked ``Dim.AUTO`` (micro-batches are smaller
    than the sample), by forward argument name; other dimensions static."""

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > batch_dim:
            return {batch_dim: torch.export.Dim.AUTO}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}


class AttentionDropout(nn.Module):
    """Fused attention whose dropout follows ``train()``/``eval()`` (the tracer fixed the
    probability the training-mode forward used)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, q, k, v, attn_mask=None, **kwargs: Any) -> torch.Tensor:
        p = self.p if self.training else 0.0
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, **kwargs
        )

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _sdpa_dropout(node: fx.Node) -> float:
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


def _export(model: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> Traced:
    ep = torch.export.export(
        model,
        args,
        kwargs,
        dynamic_shapes=_dynamic_batch(model, args, kwargs, batch_dim),
        strict=False,
    )
    sig = ep.graph_signature
    kinds = torch.export.graph_signature.InputKind
    okinds = torch.export.graph_signature.OutputKind
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants: dict[str, Any] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    n_user = 0
    for node, spec in zip(placeholders, sig.input_specs, strict=True):
        if spec.kind in (kinds.PARAMETER, kinds.BUFFER):
            env[node] = graph.get_attr(spec.target)
        elif spec.kind == kinds.CONSTANT_TENSOR:
            name = "_gpipe_const_" + re.sub(r"\W", "_", spec.target)
            constants[name] = ep.constants[spec.target]
            env[node] = graph.get_attr(name)
        elif spec.kind == kinds.USER_INPUT:
            env[node] = graph.placeholder(node.name)
            env[node].meta.update(node.meta)
            n_user += 1
        else:
            raise CaptureError(f"torch.export produced an input of kind {spec.kind.name}")
        env[node].meta.setdefault("val", node.meta.get("val"))
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    mutated = {}
    for spec, value in zip(sig.output_specs, out_node.args[0], strict=True):
        if spec.kind == okinds.BUFFER_MUTATION:
            mutated[value] = spec.target
        elif spec.kind != okinds.USER_OUTPUT:
            raise CaptureError(
                f"torch.export produced an output of kind {spec.kind.name} (the forward "
                "mutates one of its inputs in place); return the new value instead"
            )
    dropouts = 0
    for node in ep.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target == _aten.scaled_dot_product_attention.default:
            p = _sdpa_dropout(node)
            if p > 0:  # traced in training mode: drop only while training, as the model did
                name = f"_gpipe_attention_{dropouts}"
                dropouts += 1
                constants[name] = AttentionDropout(p)
                q, k, v, *rest = node.args
                mask = rest[0] if rest else node.kwargs.get("attn_mask")
                kw = {
                    k2: v2 for k2, v2 in node.kwargs.items() if k2 not in ("attn_mask", "dropout_p")
                }
                if len(rest) > 2:
                    kw["is_causal"] = rest[2]
                new = graph.call_module(
                    name, tuple(fx.map_arg((q, k, v, mask), lambda n: env[n])), kw
                )
                new.meta.update(node.meta)
                env[node] = new
                continue
        if node.op == "call_function" and node.target == _aten.dropout.default:
            name = f"_gpipe_dropout_{dropouts}"
            dropouts += 1
            constants[name] = nn.Dropout(float(node.args[1]))
            new = graph.call_module(name, (env[node.args[0]],))
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta.update(node.meta)
        env[node] = new
        if node in mutated:  # write the new buffer value back, where it is computed
            buf = graph.get_attr(mutated[node])
            buf.meta.update(node.meta)
            cp = graph.call_function(_aten.copy_.default, (buf, new))
            cp.meta.update(node.meta)
    users = [
        env[v] if isinstance(v, fx.Node) else v
        for spec, v in zip(sig.output_specs, out_node.args[0], strict=True)
        if spec.kind == okinds.USER_OUTPUT
    ]
    graph.output(tuple(users))
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    bind = _flat_bind(ep.call_spec.in_spec, n_user, _shapes(leaves, batch_dim), batch_dim)
    static = None
    for node, spec in zip(placeholders, sig.input_specs, strict=True):
        if spec.kind != kinds.USER_INPUT:
            continue
        val = node.meta.get("val")
        fixed = isinstance(val, torch.Tensor) and val.dim() > batch_dim
        if fixed and is_concrete_int(val.shape[batch_dim]):  # export specialized it
            static = int(val.shape[batch_dim])
    return Traced(graph, "export", bind, ep.call_spec.out_spec, constants, static)


def _fx(model: nn.Module, args: tuple, kwargs: dict) -> Traced:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise CaptureError(f"torch.fx cannot trace a forward with *{name}")
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    gm = fx.symbolic_trace(model, concrete_args=concrete)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    leaves, out_spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    names = list(sig.parameters)
    sample_kinds = {k: type(v) for k, v in concrete.items()}

    def bind(a: tuple, kw: dict) -> tuple:
        b = sig.bind(*a, **kw)
        b.apply_defaults()
        for k, t in sample_kinds.items():
            v = b.arguments[k]
            if type(v) is not t or (v is None) != (concrete[k] is None):
                raise TypeError(
                    f"argument {k!r} was {concrete[k]!r} in the sample (captured as a "
                    f"constant) but is {type(v).__name__} now; call the pipe with the sample's "
                    "non-tensor arguments"
                )
        return tuple(b.arguments[k] for k in names)

    return Traced(graph, "fx", bind, out_spec, {})


def _data_dependent_note(err: BaseException) -> str:
    """Where the model's Python code branched on a tensor's value, when that is the cause."""
    text = f"{type(err).__name__}: {err}"
    markers = (
        "data-dependent",
        "Data dependent",
        "GuardOnDataDependentSymNode",
        "cannot be used as inputs to control flow",
        "symbolically traced variables cannot",
    )
    if not any(m in text for m in markers):
        return ""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "/torch/" not in f.filename and "/gpipe/capture/" not in f.filename
    ]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return (
        f"\n  note: the forward branches in Python on a tensor's value{where}; a graph cannot "
        "hold that branch (it would silently keep one side); compute both sides and select "
        "with torch.where, or move the branch out of the model"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    batch_dim: int = 0,
    method: str = "auto",
) -> Traced:
    """The forward of ``model`` on ``(args, kwargs)`` as a :class:`Traced` graph.

    ``method="auto"`` tries ``torch.export`` (batch dimension dynamic) and, where it fails,
    ``torch.fx`` symbolic tracing; ``"export"`` or ``"fx"`` uses only that one.
    """
    if method not in ("auto", "export", "fx"):
        raise ValueError(f"method must be 'auto', 'export' or 'fx', got {method!r}")
    failures: list[tuple[str, BaseException]] = []
    if method in ("auto", "export"):
        try:
            return _export(model, args, kwargs, batch_dim)
        except Exception as e:
            failures.append(("torch.export", e))
    if method in ("auto", "fx"):
        try:
            return _fx(model, args, kwargs)
        except Exception as e:
            failures.append(("torch.fx", e))
    lines = "".join(f"\n  {who} failed: {_first_line(e)}" for who, e in failures)
    notes = {_data_dependent_note(e) for _, e in failures} - {""}
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph:{lines}{''.join(sorted(notes))}\n"
        "  way out: make that code traceable (see the note), or write the model as an "
        "nn.Sequential (or a list of modules) whose children each take the previous one's "
        "output; the pipe cuts those without tracing"
    ) from failures[-1][1]
