"""Capture a module's forward as one flat graph: ``torch.export`` first, ``torch.fx`` second.

:func:`trace` returns a :class:`Traced`: an ``fx.Graph`` whose placeholders are the user's
inputs (in the order :meth:`Traced.bind` flattens a call's arguments), whose ``get_attr``
nodes name the model's own parameters and buffers by their paths in the model (never copies),
and whose output is the flat list of the model's output leaves, rebuilt by ``out_spec``.

Export's lifted parameters are turned back into ``get_attr`` nodes; its lifted constants are
kept in ``constants``; ``aten.dropout`` becomes a call of an ``nn.Dropout`` module (so the
keyed random streams see a known random module) and a fused attention traced with dropout an
:class:`AttentionDropout`, so the graph follows ``train()``/``eval()``.

A forward that gathers keywords in ``**kwargs`` is exported with the call's keywords shown
as named parameters (export cannot place dynamic shapes in ``**kwargs``); the forward itself
runs unchanged.

The invariant: running the graph with the model's parameters computes, op for op, what
``model(*args, **kwargs)`` computes for inputs of the sample's structure. Where neither tracer
gives such a graph, :func:`trace` raises one :class:`CaptureError` naming both failures.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["CaptureError", "Traced", "trace"]

_aten = torch.ops.aten
# export's checks that a tensor keeps the dtype/device it had at capture; under autocast an
# activation's dtype differs by design, so the graph drops them (the ops themselves check)
_METADATA_ASSERTS = {
    op
    for name in ("_assert_tensor_metadata",)
    if (op := getattr(getattr(_aten, name, None), "default", None)) is not None
}
# a region of the forward traced with gradients switched (``torch.no_grad()``, or a reentrant
# ``torch.utils.checkpoint``, which runs its body under no_grad)
_SET_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


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
    no_grad_regions: bool = False  # the graph holds a region traced with gradients off


def _fixed_sizes(val: Any, batch_dim: int) -> dict[int, int]:
    """The sizes of a traced input that the graph fixed (every dimension but the batch one
    was traced variable; a size the forward specialized on stays a plain int)."""
    if not isinstance(val, torch.Tensor):
        return {}
    return {d: int(n) for d, n in enumerate(val.shape) if d != batch_dim and is_concrete_int(n)}


@dataclass(frozen=True)
class InputRule:
    """What a call's flat input leaf must be for the graph to compute the model's forward:
    a tensor of ``dims`` dimensions whose ``fixed`` sizes (dimension -> size) are the
    sample's, or a non-tensor equal to the sample's ``value`` (the tracer baked it in)."""

    path: str
    dims: int | None = None  # None: not a tensor
    fixed: dict[int, int] = field(default_factory=dict)
    value: Any = None


def _rules(in_spec: pytree.TreeSpec, leaves: list, vals: list, batch_dim: int) -> list[InputRule]:
    paths = [
        pytree.keystr(k)
        for k, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(leaves, in_spec))[0]
    ]
    rules = []
    for path, leaf, val in zip(paths, leaves, vals, strict=True):
        if isinstance(leaf, torch.Tensor):
            rules.append(InputRule(path, leaf.dim(), _fixed_sizes(val, batch_dim)))
        else:
            rules.append(InputRule(path, value=leaf))
    return rules


def _argument(path: str) -> str:
    """``[0][1]`` -> positional argument 1; ``[1]['mask']`` -> keyword argument 'mask'."""
    m = re.match(r"\[(\d)\]\[([^\]]+)\](.*)", path)
    if not m:
        return f"input {path}"
    kind, key, rest = m.groups()
    what = f"positional argument {key}" if kind == "0" else f"keyword argument {key}"
    return what + (f" (at {rest})" if rest else "")


def _flat_bind(
    in_spec: pytree.TreeSpec, rules: list[InputRule], batch_dim: int
) -> Callable[[tuple, dict], tuple]:
    def bind(args: tuple, kwargs: dict) -> tuple:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != in_spec:
            raise TypeError(
                "the pipe was captured for calls shaped like its sample, "
                f"{_describe(in_spec)}, but got {_describe(spec)}{_first_change(in_spec, spec)}; "
                "call it with the same positional and keyword arguments as sample= (values "
                "may differ, the nesting of lists, tuples and dicts may not)"
            )
        for rule, leaf in zip(rules, leaves, strict=True):
            _check_leaf(rule, leaf, batch_dim)
        return tuple(leaves)

    return bind


def _show(value: Any) -> str:
    """A value for a message: a tensor by its shape and dtype, not its numbers."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    return repr(value)


def _constant_changed(where: str, now: Any, sample: Any) -> str:
    return (
        f"{where} is {_show(now)}, but the model was captured with {_show(sample)} there: the "
        "tracer "
        "fixed this non-tensor argument's value into the graph, so the pipe would silently "
        "compute with the sample's; build the pipe with sample= holding this value (one pipe "
        "per value), or pass it as a tensor"
    )


def _check_leaf(rule: InputRule, leaf: Any, batch_dim: int) -> None:
    where = _argument(rule.path)
    if rule.dims is None:
        if (
            isinstance(leaf, torch.Tensor)
            or type(leaf) is not type(rule.value)
            or not _same_constant(leaf, rule.value)
        ):
            raise ValueError(_constant_changed(where, leaf, rule.value))
        return
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{where} was a tensor in the sample, got {type(leaf).__name__}")
    if leaf.dim() != rule.dims:
        raise ValueError(
            f"{where} has {leaf.dim()} dimensions (shape {tuple(leaf.shape)}), but the "
            f"sample's had {rule.dims}; call the pipe with inputs of the sample's rank"
        )
    for d, n in rule.fixed.items():
        if leaf.shape[d] != n:
            raise ValueError(
                f"{where} has size {leaf.shape[d]} in dimension {d} (shape "
                f"{tuple(leaf.shape)}), but the model's forward fixes that size at {n} "
                "(torch.export could not keep it variable: the forward specializes on it); "
                f"pad or cut it to {n}, or build the pipe with a sample of this size"
            )


def _kind(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "one value (a tensor)"
    return f"a {getattr(spec.type, '__name__', spec.type)} of {spec.num_children}"


def _first_change(want: pytree.TreeSpec, got: pytree.TreeSpec) -> str:
    """Where a call's arguments are nested otherwise than the sample's (same arguments)."""
    try:
        (wa, wk), (ga, gk) = want.children(), got.children()
        if wa.num_children != ga.num_children or wk.context != gk.context:
            return ""
        pairs = [
            (f"positional argument {i}", a, b)
            for i, (a, b) in enumerate(zip(wa.children(), ga.children(), strict=True))
        ]
        pairs += [
            (f"keyword argument {k!r}", a, b)
            for k, a, b in zip(wk.context, wk.children(), gk.children(), strict=True)
        ]
    except Exception:  # pragma: no cover - defensive
        return ""
    for where, a, b in pairs:
        if a != b:
            return f" ({where} is {_kind(b)} where the sample had {_kind(a)})"
    return ""


def _describe(spec: pytree.TreeSpec) -> str:
    try:
        args, kwargs = spec.children()
        kw = list(kwargs.context) if kwargs.context else []
        return f"{args.num_children} positional argument(s) and keyword(s) {kw}"
    except Exception:  # pragma: no cover - defensive
        return str(spec)


def _dynamic_dims(
    model: nn.Module, args: tuple, kwargs: dict, batch_dim: int, every_dim: bool = True
) -> Any:
    """Every tensor input's dimensions marked ``Dim.AUTO``, by forward argument name: the batch
    dimension (micro-batches are smaller than the sample) and, with ``every_dim``, the others
    too (a batch of another sequence length runs the same graph). Export keeps a dimension
    variable unless the forward specializes on it; :class:`InputRule` then names it."""

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > batch_dim:
            dims = range(v.dim()) if every_dim else (batch_dim,)
            return dict.fromkeys(dims, torch.export.Dim.AUTO)
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


def _without_asserts(body: fx.GraphModule) -> fx.GraphModule:
    """A copy of a higher-order op's body (and the bodies nested in it) without export's
    dtype assertions (see ``_METADATA_ASSERTS``)."""
    body = copy.deepcopy(body)
    for gm in body.modules():
        if isinstance(gm, fx.GraphModule):
            for n in [n for n in gm.graph.nodes if n.target in _METADATA_ASSERTS]:
                gm.graph.erase_node(n)
            gm.recompile()
    return body


def _dropout_trains(node: fx.Node) -> bool:
    """Whether an ``aten.dropout(x, p, train)`` node was traced in training mode."""
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True))


def _sdpa_dropout(node: fx.Node) -> float:
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


@contextlib.contextmanager
def _named_keywords(model: nn.Module, kwargs: dict) -> Iterator[None]:
    """While exporting, a forward that gathers keywords in ``**kwargs`` shows the call's
    keywords as named keyword-only parameters (export cannot match dynamic shapes to a
    ``**kwargs`` argument: "Must provide a tree_name"); the model's forward runs as it is."""
    forward = model.forward
    sig = inspect.signature(forward)
    params = list(sig.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        yield
        return
    named = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs if k not in named]
    kept = [p for p in params if p.kind is not p.VAR_KEYWORD]

    def shown(*args: Any, **kw: Any) -> Any:
        return forward(*args, **kw)

    shown.__signature__ = sig.replace(parameters=kept + extra)  # type: ignore[attr-defined]
    own = model.__dict__.get("forward", None)
    model.forward = shown  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own  # type: ignore[method-assign]


def _export(model: nn.Module, args: tuple, kwargs: dict, batch_dim: int, tag: str = "") -> Traced:
    with _named_keywords(model, kwargs):
        try:
            ep = torch.export.export(
                model,
                args,
                kwargs,
                dynamic_shapes=_dynamic_dims(model, args, kwargs, batch_dim),
                strict=False,
            )
        except Exception:  # a variable sequence length defeats this forward: keep the sample's
            ep = torch.export.export(
                model,
                args,
                kwargs,
                dynamic_shapes=_dynamic_dims(model, args, kwargs, batch_dim, every_dim=False),
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
            name = f"_gpipe{tag}_const_" + re.sub(r"\W", "_", spec.target)
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
        if node.op == "call_function" and node.target in _METADATA_ASSERTS:
            continue  # a dtype fixed at capture: autocast legitimately changes it
        if node.op == "get_attr" and isinstance(
            getattr(ep.graph_module, str(node.target), None), fx.GraphModule
        ):  # the body of a higher-order op (an autocast or no_grad region, a checkpoint)
            name = f"_gpipe{tag}_{node.target}"
            constants[name] = _without_asserts(getattr(ep.graph_module, str(node.target)))
            env[node] = graph.get_attr(name)
            env[node].meta.update(node.meta)
            continue
        if node.op == "call_function" and node.target == _aten.scaled_dot_product_attention.default:
            p = _sdpa_dropout(node)
            if p > 0:  # traced in training mode: drop only while training, as the model did
                name = f"_gpipe{tag}_attention_{dropouts}"
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
            if not _dropout_trains(node):  # traced in eval mode: ATen's no-op stays
                new = graph.node_copy(node, lambda n: env[n])
                new.meta.update(node.meta)
                env[node] = new
                continue
            name = f"_gpipe{tag}_dropout_{dropouts}"
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
    if len(leaves) != n_user:  # pragma: no cover - export's own contract
        raise CaptureError(f"torch.export gave {n_user} inputs for {len(leaves)} leaves")
    vals = [
        node.meta.get("val")
        for node, spec in zip(placeholders, sig.input_specs, strict=True)
        if spec.kind == kinds.USER_INPUT
    ]
    bind = _flat_bind(
        ep.call_spec.in_spec, _rules(ep.call_spec.in_spec, leaves, vals, batch_dim), batch_dim
    )
    static = None
    for node, spec in zip(placeholders, sig.input_specs, strict=True):
        if spec.kind != kinds.USER_INPUT:
            continue
        val = node.meta.get("val")
        fixed = isinstance(val, torch.Tensor) and val.dim() > batch_dim
        if fixed and is_concrete_int(val.shape[batch_dim]):  # export specialized it
            static = int(val.shape[batch_dim])
    no_grad = any(
        n.op == "call_function" and n.target is _SET_GRAD and n.args and n.args[0] is False
        for n in ep.graph.nodes
    )
    return Traced(graph, "export", bind, ep.call_spec.out_spec, constants, static, no_grad)


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
            if type(v) is not t or not _same_constant(v, concrete[k]):
                raise ValueError(_constant_changed(f"argument {k!r}", v, concrete[k]))
        return tuple(b.arguments[k] for k in names)

    return Traced(graph, "fx", bind, out_spec, {})


def _same_constant(a: Any, b: Any) -> bool:
    """Whether a call's non-tensor argument is the sample's (``None`` and modules by identity)."""
    if a is None or b is None or isinstance(a, nn.Module):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


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


def _cache_note(err: BaseException) -> str:
    """The way out when the forward returns a key/value cache (a transformers model left at
    ``use_cache=True``): a cache object is no tensor tree a pipe can pass on or merge."""
    if not re.search(r"Cache'?>? in output|Cache\b.*register a pytree", f"{err}", re.S):
        return ""
    return (
        "\n  note: the forward returns a key/value cache (use_cache=True); a pipeline trains "
        "without one: build the model with use_cache=False (model.config.use_cache = False) "
        "or pass use_cache=False in sample= and in every call"
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
    tag: str = "",
) -> Traced:
    """The forward of ``model`` on ``(args, kwargs)`` as a :class:`Traced` graph.

    ``method="auto"`` tries ``torch.export`` (every dimension of a tensor input variable
    where the forward allows, else the batch dimension alone) and, where it fails,
    ``torch.fx`` symbolic tracing; ``"export"`` or ``"fx"`` uses only that one. ``tag`` goes
    into the names of the modules and constants the capture adds, so the graphs of one model
    in several modes can live side by side.
    """
    if method not in ("auto", "export", "fx"):
        raise ValueError(f"method must be 'auto', 'export' or 'fx', got {method!r}")
    failures: list[tuple[str, BaseException]] = []
    if method in ("auto", "export"):
        try:
            return _export(model, args, kwargs, batch_dim, tag)
        except Exception as e:
            failures.append(("torch.export", e))
    if method in ("auto", "fx"):
        try:
            return _fx(model, args, kwargs)
        except Exception as e:
            failures.append(("torch.fx", e))
    lines = "".join(f"\n  {who} failed: {_first_line(e)}" for who, e in failures)
    notes = {note(e) for _, e in failures for note in (_data_dependent_note, _cache_note)} - {""}
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph:{lines}{''.join(sorted(notes))}\n"
        "  way out: make that code traceable (see the note), or write the model as an "
        "nn.Sequential (or a list of modules) whose children each take the previous one's "
        "output; the pipe cuts those without tracing"
    ) from failures[-1][1]
