"""What a pipe was built from, checked at every call: the modules, parameters and buffers that
sat at each place of the user's model.

A pipe runs the objects it found when it was built: a captured graph reads the model's
parameters and buffers by the objects it attached, and a stage holds the layers it was given.
An object put in their place afterwards (a LoRA wrapper around a ``Linear``, a buffer
reassigned with ``model.scale = t``, ``pipe.layers[2] = adapter``) would silently never run.
:class:`Snapshot` remembers every edge ``parent.<name> -> object`` along those places and
:meth:`Snapshot.check` refuses a call, naming the place, when any of them changed.

The invariant: while :meth:`Snapshot.check` passes, every object the pipe runs is the object
the model holds at that place now. The check costs one attribute read per edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ModelChanged", "Snapshot"]


class ModelChanged(RuntimeError):
    """The model was changed after the pipe was built (the message names the place)."""


@dataclass(frozen=True)
class _Edge:
    parent: Any
    name: str
    child: Any
    path: str


def _kind(obj: Any) -> str:
    if obj is None:
        return "nothing"
    if isinstance(obj, nn.Module):
        return f"a {type(obj).__name__}"
    if isinstance(obj, nn.Parameter):
        return f"a Parameter of shape {tuple(obj.shape)}"
    shape = getattr(obj, "shape", None)
    return f"a {type(obj).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


class Snapshot:
    """Edges ``parent.<name> -> child`` recorded when a pipe is built; see the module doc."""

    def __init__(self, root_name: str = "model") -> None:
        self.root_name = root_name
        self._edges: dict[tuple[int, str], _Edge] = {}

    def __len__(self) -> int:
        return len(self._edges)

    def add(self, parent: Any, name: str, path: str) -> None:
        """Remember what ``parent.<name>`` is now (``path``: how the message names it)."""
        key = (id(parent), name)
        if key not in self._edges:
            self._edges[key] = _Edge(
                parent, name, getattr(parent, name, None), f"{self.root_name}.{path}"
            )

    def merge(self, other: Snapshot) -> None:
        """Also check ``other``'s places."""
        for key, edge in other._edges.items():
            self._edges.setdefault(key, edge)

    def add_path(self, root: nn.Module, path: str) -> None:
        """Remember every edge from ``root`` along the dotted ``path``."""
        obj: Any = root
        done: list[str] = []
        for name in path.split("."):
            if obj is None or not hasattr(obj, name):
                return
            done.append(name)
            self.add(obj, name, ".".join(done))
            obj = getattr(obj, name)

    def changed(self) -> list[str]:
        """One line for each place whose object is not the recorded one."""
        out = []
        for e in self._edges.values():
            now = getattr(e.parent, e.name, None)
            if now is not e.child:
                is_, was = _kind(now), _kind(e.child)
                if is_ == was:  # another object of the same kind
                    is_ = "another " + is_.removeprefix("a ")
                out.append(f"{e.path} is {is_}, but was {was} when the pipe was built")
        return out

    def check(self, who: str = "the pipe") -> None:
        """Raise :class:`ModelChanged` when any recorded place holds another object now."""
        lines = self.changed()
        if lines:
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise ModelChanged(
                f"{lines[0]}{more}: {who} runs the modules, parameters and buffers it was "
                "built with, so the new one would silently never run; change the model "
                "first and build the pipe again (gpipe.Pipe(model, sample=...)), or change "
                "values in place (param.data.copy_(...), buffer.copy_(...))"
            )
