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
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["CapturedLayers", "Loading", "ModelKeys", "Segment", "attach"]


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


def attach(segment: nn.Module, model: nn.Module, target: str, constants: dict[str, Any]) -> None:
    """Make ``segment.<target>`` the model's object at ``target`` (or the capture's constant)."""
    if target in constants:
        _set(segment, target, constants[target], persistent=False)
        return
    owner_path, _, attr = target.rpartition(".")
    try:
        obj = model.get_submodule(target)
        _set(segment, target, obj)
        return
    except AttributeError:
        pass
    owner = model.get_submodule(owner_path) if owner_path else model
    if owner_path and not owner._modules:  # a leaf module: attach it whole
        _set(segment, owner_path, owner)
        return
    value = getattr(owner, attr)
    _set(segment, target, value, persistent=attr not in owner._non_persistent_buffers_set)


class Segment(nn.Module):
    """A piece of a captured graph. The first segment takes the user's flat inputs, the others
    one boundary tuple; the last returns the model's output structure (``out_spec``)."""

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
    ) -> None:
        super().__init__()
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module"):
                attach(self, model, str(node.target), constants)
        gm = fx.GraphModule(self, graph)
        # the generated code reads attributes through these dicts: share ours
        gm.__dict__["_modules"] = self._modules
        gm.__dict__["_parameters"] = self._parameters
        gm.__dict__["_buffers"] = self._buffers
        self.__dict__["_graph_module"] = gm
        self.first = first
        self.out_spec = out_spec
        self.boundary = boundary  # names of the values this segment receives
        self.static_batch = static_batch if first else None
        self.batch_dim = batch_dim

    @property
    def code(self) -> str:
        """The Python code this segment runs (for reading and debugging)."""
        return self._graph_module.code

    def _check_batch(self, args: tuple) -> None:
        for v in args:
            if isinstance(v, torch.Tensor) and v.dim() > self.batch_dim:
                n = v.shape[self.batch_dim]
                if n != self.static_batch:
                    raise ValueError(
                        f"this micro-batch has {n} rows, but the model's forward fixes the "
                        f"batch size at {self.static_batch} (torch.export could not keep it "
                        f"variable); give the pipe micro_batch_size={self.static_batch}, or "
                        "capture on a sample of one micro-batch"
                    )
                return

    def forward(self, *args: Any) -> Any:
        if self.static_batch is not None:
            self._check_batch(args)
        if not self.first:
            (args,) = args
        out = self._graph_module(*args)
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(out), self.out_spec)
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

    ``bind(args, kwargs)`` turns a call's arguments into the first segment's flat inputs;
    ``split_balance`` is the layers per stage forced by ``split_points`` (or ``None``);
    ``method`` says which tracer captured it; ``model_name`` the captured class; ``keys`` the
    model's own ``state_dict`` keys (:class:`ModelKeys`)."""

    def __init__(
        self,
        segments: list[tuple[str, Segment]],
        bind: Callable[[tuple, dict], tuple],
        *,
        method: str,
        model_name: str,
        split_balance: list[int] | None = None,
        key_order: list[str] | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        for name, seg in segments:
            self.add_module(name, seg)
        self.__dict__["bind"] = bind
        self.method = method
        self.model_name = model_name
        self.split_balance = split_balance
        self.keys = ModelKeys(list(key_order or ()), dict(aliases or {}))
        Loading(self, self.keys, lambda: self._modules)

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:  # type: ignore[override]
        """The model's own keys (under ``prefix``), each once."""
        return self.keys.state_dict(self._modules, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"captured {self.model_name} with {self.method}, {len(self)} layers"
