"""One cut piece of a captured graph as an ordinary module, and the sequence that holds them.

A :class:`Segment` runs a piece of the graph. Its attributes are the model's *own* objects at
the model's own paths (a leaf module is attached whole, so ``to_empty`` and ``reset_parameters``
reach the model's modules; a tensor held by a non-leaf module is attached alone), so a
segment's ``state_dict`` keys are the model's keys and weights used by two segments (input
embedding = output head) are one ``Parameter`` in both.

:class:`CapturedLayers` is the ``nn.Sequential`` of segments the pipe runs. The invariant:
its ``state_dict`` has exactly the keys and tensors of the model's ``state_dict`` for the
parameters and buffers the graph uses (no segment names in them), and ``load_state_dict``
takes the model's own state dict and names the keys it misses as the model names them.
:class:`ModelKeys` is that mapping for any holder of segments (also a ``DistributedPipe``
rank, whose keys are the model's keys its segments hold).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from gpipe.base.snapshot import Snapshot

__all__ = [
    "CapturedLayers",
    "Loading",
    "ModelKeys",
    "Segment",
    "attach",
    "attached_path",
    "modes_of",
]


def modes_of(model: nn.Module) -> tuple[bool, ...]:
    """The training flag of every module of ``model``, in ``modules()`` order."""
    return tuple(m.training for m in model.modules())


def _mode_mismatch(model: nn.Module, variants: dict[tuple[bool, ...], int]) -> str:
    now = modes_of(model)
    names = [n or "(the model)" for n, _ in model.named_modules()]
    closest = min(variants, key=lambda v: sum(a != b for a, b in zip(v, now)))
    diff = [(n, a) for n, a, b in zip(names, now, closest) if a != b]
    where = ", ".join(f"{n} is in {'train' if a else 'eval'} mode" for n, a in diff[:3])
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return (
        f"the model's modules are in a mix of modes the pipe did not capture ({where}{more}): "
        "a captured graph fixes what each module does in its mode, and the pipe holds graphs "
        "for the whole model in train mode, in eval mode and in the modes it had when the pipe "
        "was built; call pipe.train() or pipe.eval(), or set the modules' modes before "
        "building the pipe"
    )


def _set(root: nn.Module, path: str, obj: Any, persistent: bool = True) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        nxt = mod._modules.get(p)
        if nxt is None:
            nxt = nn.Module()
            mod.add_module(p, nxt)
        mod = nxt
    if isinstance(obj, nn.Module):
        mod._modules[leaf] = obj
    elif isinstance(obj, nn.Parameter):
        mod._parameters[leaf] = obj
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj, persistent=persistent)
    else:
        setattr(mod, leaf, obj)


def attached_path(model: nn.Module, target: str) -> str:
    """The place in ``model`` whose object a segment attaches for graph target ``target``: a
    module, the leaf module that owns a tensor (attached whole), or the tensor itself."""
    try:
        model.get_submodule(target)
        return target
    except AttributeError:
        pass
    owner_path, _, _ = target.rpartition(".")
    if owner_path and not model.get_submodule(owner_path)._modules:
        return owner_path
    return target


def attach(segment: nn.Module, model: nn.Module, target: str, constants: dict[str, Any]) -> None:
    """Make ``segment.<target>`` the model's object at ``target`` (or the capture's constant)."""
    if target in constants:
        _set(segment, target, constants[target], persistent=False)
        return
    path = attached_path(model, target)
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    value = getattr(owner, attr)
    if isinstance(value, nn.Module):  # a module, or a leaf module that owns the tensor
        _set(segment, path, value)
        return
    _set(segment, path, value, persistent=attr not in owner._non_persistent_buffers_set)


@dataclass
class _Graph:
    """One variant of a segment: its code and what it receives and returns."""

    module: fx.GraphModule
    out_spec: pytree.TreeSpec | None
    boundary: tuple[str, ...]
    static_batch: int | None
    made: list[nn.Module]  # the capture's own modules (dropouts), not the model's


class Segment(nn.Module):
    """A piece of a captured graph. The first segment takes the user's flat inputs, the others
    one boundary tuple; the last returns the model's output structure (``out_spec``).

    A segment holds one graph per captured variant of the model (its modes: train, eval, or
    the mix it was captured in) and runs the one :attr:`graph_key` names, which
    :meth:`CapturedLayers.bind` selects for every segment before a call."""

    def __init__(
        self,
        graph: fx.Graph,
        model: nn.Module,
        constants: dict[str, Any],
        *,
        first: bool,
        out_spec: pytree.TreeSpec | None,
        boundary: tuple[str, ...],
        static_batch: int | None = None,
        batch_dim: int = 0,
        key: int = 0,
    ) -> None:
        super().__init__()
        self.first = first
        self.batch_dim = batch_dim
        self.__dict__["_graphs"] = {}
        #: the variant the segment runs (an index into :attr:`CapturedLayers.variants`)
        self.graph_key = key
        self.add_graph(
            key,
            graph,
            model,
            constants,
            out_spec=out_spec,
            boundary=boundary,
            static_batch=static_batch,
        )

    def add_graph(
        self,
        key: int,
        graph: fx.Graph,
        model: nn.Module,
        constants: dict[str, Any],
        *,
        out_spec: pytree.TreeSpec | None,
        boundary: tuple[str, ...],
        static_batch: int | None = None,
    ) -> None:
        """Add the graph of variant ``key``, attaching the model objects it reads."""
        own = []
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module"):
                attach(self, model, str(node.target), constants)
                made = constants.get(str(node.target))
                if isinstance(made, nn.Module):
                    own.append(made)
        gm = fx.GraphModule(self, graph)
        # the generated code reads attributes through these dicts: share ours
        gm.__dict__["_modules"] = self._modules
        gm.__dict__["_parameters"] = self._parameters
        gm.__dict__["_buffers"] = self._buffers
        # held in our __dict__ too, where a table swap (gpipe.stage.shared_params) finds it
        self.__dict__[f"_graph_module_{key}"] = gm
        self._graphs[key] = _Graph(
            gm, out_spec, boundary, static_batch if self.first else None, own
        )

    def select(self, key: int) -> None:
        """Run the graph of variant ``key`` from now on. The modules the capture made for it
        (dropouts it found drawing) draw whatever mode they were set to: they exist only in
        the graphs of modes that draw."""
        if self.graph_key != key:
            self.graph_key = key
        for m in self._graphs[key].made:
            if not m.training:
                m.training = True

    @property
    def keys(self) -> list[int]:
        """The variants this segment holds a graph for."""
        return list(self._graphs)

    @property
    def _active(self) -> _Graph:
        return self._graphs[self.graph_key]

    @property
    def code(self) -> str:
        """The Python code this segment runs (for reading and debugging)."""
        return self._active.module.code

    @property
    def boundary(self) -> tuple[str, ...]:
        """Names of the values this segment receives."""
        return self._active.boundary

    @property
    def static_batch(self) -> int | None:
        """The batch size the forward fixed (``None``: variable)."""
        return self._active.static_batch

    def _check_batch(self, args: tuple, static: int) -> None:
        for v in args:
            if isinstance(v, torch.Tensor) and v.dim() > self.batch_dim:
                n = v.shape[self.batch_dim]
                if n != static:
                    raise ValueError(
                        f"this micro-batch has {n} rows, but the model's forward fixes the "
                        f"batch size at {static} (torch.export could not keep it "
                        f"variable); give the pipe micro_batch_size={static}, or "
                        "capture on a sample of one micro-batch"
                    )
                return

    def run_recording(self, *args: Any) -> tuple[Any, dict[str, Any], list[fx.Node]]:
        """Run like :meth:`forward` (the active graph), also returning every node's value by
        name and the graph's nodes in order: the self-check locates a divergence with it."""
        active = self._active
        values: dict[str, Any] = {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                values[n.name] = out
                return out

        flat = args if self.first else args[0]
        out = _Recorder(active.module).run(*flat)
        if active.out_spec is not None:
            out = pytree.tree_unflatten(list(out), active.out_spec)
        return out, values, list(active.module.graph.nodes)

    def forward(self, *args: Any) -> Any:
        active = self._active
        if active.static_batch is not None:
            self._check_batch(args, active.static_batch)
        if not self.first:
            (args,) = args
        out = active.module(*args)
        if active.out_spec is not None:
            return pytree.tree_unflatten(list(out), active.out_spec)
        return out


class ModelKeys:
    """The captured model's own ``state_dict`` keys for modules that hold segments by name
    (:class:`CapturedLayers`, and a ``DistributedPipe`` holding its rank's segments): a
    segment's keys are already the model's, so a holder's keys drop the segment names; a
    state dict of the model's keys is spread back to the segments for loading, and the keys a
    load misses are named as the model names them."""

    def __init__(self, key_order: list[str], aliases: dict[str, list[str]]) -> None:
        self.key_order = list(key_order)
        self.aliases = {k: list(v) for k, v in aliases.items()}

    def state_dict(
        self,
        segments: dict[str, nn.Module],
        destination: Any,
        prefix: str,
        keep_vars: bool,
        tied_names: bool = True,
    ) -> Any:
        """The segments' state under the model's own keys (after ``prefix``), each once, in
        the model's order; with ``tied_names`` also a tied tensor's other names (the whole
        model's keys), else only the names the segments hold (one rank's share)."""
        held: dict[str, Any] = {}
        for seg in segments.values():
            seg.state_dict(destination=held, prefix="", keep_vars=keep_vars)
        if destination is None:
            destination = OrderedDict()
        for key in self.key_order:
            names = [key, *self.aliases.get(key, ())] if tied_names else [key]
            found = next((a for a in names if a in held), None)
            if found is not None:
                destination[prefix + key] = held[found]
        for key, value in held.items():
            if prefix + key not in destination:
                destination[prefix + key] = value
        return destination

    def spread(self, segments: dict[str, nn.Module], state_dict: dict, prefix: str) -> dict:
        """Give each segment the model keys it holds (``load_state_dict`` sends keys by child
        name); returns each segment key (as the load sees it) → the model's key."""
        spread, names = set(), {}
        for name, seg in segments.items():
            for key in seg.state_dict(keep_vars=True):
                names[f"{prefix}{name}.{key}"] = prefix + key
                if prefix + key in state_dict:
                    state_dict[f"{prefix}{name}.{key}"] = state_dict[prefix + key]
                    spread.add(prefix + key)
        for key in spread:
            for alias in self.aliases.get(key[len(prefix) :], ()):
                state_dict.pop(prefix + alias, None)
            state_dict.pop(key, None)
        return names

    @staticmethod
    def rename_missing(missing: list[str], names: dict[str, str]) -> None:
        """The missing keys of a load as the model names them (in place, each once)."""
        missing[:] = list(dict.fromkeys(names.get(k, k) for k in missing))


class Loading:
    """A holder's load hooks around :class:`ModelKeys`: the pre-hook spreads the model's keys
    to the segments, the post-hook names the missing keys with the model's keys."""

    def __init__(self, holder: nn.Module, keys: ModelKeys, segments: Callable[[], dict]) -> None:
        self.keys, self.segments = keys, segments
        self.names: dict[str, str] = {}
        holder._register_load_state_dict_pre_hook(self.before)
        holder.register_load_state_dict_post_hook(self.after)

    def before(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self.names = self.keys.spread(self.segments(), state_dict, prefix)

    def after(self, module: nn.Module, incompatible: Any) -> None:
        ModelKeys.rename_missing(incompatible.missing_keys, self.names)


class CapturedLayers(nn.Sequential):
    """The segments of a captured model, in order, with what the pipe needs around them.

    ``prepare()`` checks that the model still holds the objects the segments run
    (``snapshot``) and selects, in every segment, the graph of the modes the model is in now
    (``variants``: modes -> graph key; ``pipe.train()`` / ``pipe.eval()`` reach the model
    through :meth:`train`); ``bind(args, kwargs)`` turns a call's arguments into the first
    segment's flat inputs for that graph; ``split_balance`` is the layers per stage forced by
    ``split_points`` (or ``None``); ``method`` says which tracer captured it; ``model_name``
    the captured class;
    ``keys`` the model's own ``state_dict`` keys (:class:`ModelKeys`)."""

    def __init__(
        self,
        segments: list[tuple[str, Segment]],
        binds: dict[int, Callable[[tuple, dict], tuple]],
        *,
        method: str,
        model_name: str,
        model: nn.Module | None = None,
        variants: dict[tuple[bool, ...], int] | None = None,
        snapshot: Snapshot | None = None,
        split_balance: list[int] | None = None,
        key_order: list[str] | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        for name, seg in segments:
            self.add_module(name, seg)
        self.__dict__["_binds"] = dict(binds)
        self.__dict__["_key"] = next(iter(binds))  # the variant the segments run now
        self.__dict__["_model"] = model  # not a child: its objects live in the segments
        # the modules whose modes select a graph (``modes_of``'s order, listed once)
        self.__dict__["_model_modules"] = [] if model is None else list(model.modules())
        self.variants = dict(variants or {})
        self.snapshot = snapshot or Snapshot()
        self.method = method
        self.model_name = model_name
        self.split_balance = split_balance
        self.keys = ModelKeys(list(key_order or ()), dict(aliases or {}))
        Loading(self, self.keys, lambda: self._modules)
        if model is not None:
            self.training = model.training

    def train(self, mode: bool = True) -> CapturedLayers:
        """Set the mode of the segments and of the whole model (its non-leaf modules too)."""
        super().train(mode)
        if self._model is not None:
            self._model.train(mode)
        return self

    def select(self) -> int:
        """Make every segment run the graph of the modes the model is in now; its key."""
        if self._model is None or not self.variants:
            return self._key
        modes = tuple(m.training for m in self._model_modules)
        key = self.variants.get(modes)
        if key is None:
            raise RuntimeError(_mode_mismatch(self._model, self.variants))
        for seg in self._modules.values():
            seg.select(key)
        self.__dict__["_key"] = key
        return key

    def prepare(self, who: str = "the pipe") -> int:
        """Before a call: refuse a model that no longer holds the objects the graphs run
        (``snapshot``), then :meth:`select` the graph of its modes now."""
        self.snapshot.check(who)
        return self.select()

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """A call's arguments as the first segment's flat inputs, for the graph selected last
        (a pipe :meth:`prepare` s before every call)."""
        return self._binds[self._key](tuple(args), dict(kwargs))

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:  # type: ignore[override]
        """The model's own keys (under ``prefix``), each once."""
        return self.keys.state_dict(self._modules, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"captured {self.model_name} with {self.method}, {len(self)} layers"
