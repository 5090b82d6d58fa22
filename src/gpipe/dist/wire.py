"""The wire format of boundary values between processes: a pytree as JSON metadata + tensors.

:func:`encode` flattens a value into metadata (the pytree with each tensor replaced by its
shape, dtype and ``requires_grad``) and the list of its tensors; :func:`decode` rebuilds it.
The invariant: ``decode(*encode(v))`` equals ``v`` (tensors detached) for every allowed value,
and anything that cannot cross a process boundary is refused by :func:`encode` with a
``TypeError`` naming the leaf's path and the allowed types — before anything is sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ALLOWED", "as_bytes", "decode", "encode", "tensor_specs"]

ALLOWED = "dict, list, tuple, None, bool, int, float, str and dense torch.Tensor"
_ALLOWED = ALLOWED


def encode(value: Any, where: str = "value") -> tuple[bytes, list[torch.Tensor]]:
    """Flatten ``value`` into JSON metadata and the list of its tensors (detached).

    Allowed leaves: ``None``, ``bool``, ``int``, ``float``, ``str`` and dense tensors, inside
    ``dict`` (keys: str/int/float/bool/None), ``list`` and ``tuple``. Anything else raises
    ``TypeError`` naming ``where`` and the path of the bad leaf, since it cannot cross a process
    boundary. :func:`decode` rebuilds the value.
    """
    if type(value) is torch.Tensor:  # the common boundary value: its metadata is cached
        _check_tensor(value, "value", where)
        return _lone_meta(tuple(value.shape), value.dtype, value.requires_grad), [value.detach()]
    tensors: list[torch.Tensor] = []
    specs: list[dict[str, Any]] = []
    tree = _walk(value, "value", where, tensors, specs)
    return _dumps(tree, specs), tensors


def _dumps(tree: Any, specs: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": tree, "ts": specs}, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=256)
def _lone_meta(shape: tuple[int, ...], dtype: torch.dtype, rg: bool) -> bytes:
    """The metadata of a value that is one tensor (what :func:`_walk` would give it)."""
    return _dumps({"x": 0}, [_spec(shape, dtype, rg)])


def _spec(shape: Any, dtype: torch.dtype, rg: bool) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "rg": bool(rg)}


def _check_tensor(obj: torch.Tensor, path: str, where: str) -> None:
    if obj.layout != torch.strided or obj.is_quantized or obj.is_nested:
        raise TypeError(
            f"{where}: {path} is a {obj.layout} tensor; only dense (strided) tensors "
            "can be sent between pipeline stages"
        )
    if obj.device.type == "meta":
        raise TypeError(f"{where}: {path} is a meta tensor and holds no data to send")


# The walks are module functions, not closures: a recursive closure is a reference cycle that
# would keep every tensor of the message alive until the cyclic garbage collector runs.
def _walk(obj: Any, path: str, where: str, tensors: list, specs: list) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if type(obj) not in (type(None), bool, int, float, str):
            raise _bad(obj, path, where)
        return obj
    if isinstance(obj, torch.Tensor):
        _check_tensor(obj, path, where)
        specs.append(_spec(obj.shape, obj.dtype, obj.requires_grad))
        tensors.append(obj.detach())
        return {"x": len(tensors) - 1}
    if type(obj) is list:
        return {"l": [_walk(v, f"{path}[{i}]", where, tensors, specs) for i, v in enumerate(obj)]}
    if type(obj) is tuple:
        return {"t": [_walk(v, f"{path}[{i}]", where, tensors, specs) for i, v in enumerate(obj)]}
    if type(obj) is dict:
        items = []
        for k, v in obj.items():
            if k is not None and type(k) not in (bool, int, float, str):
                raise TypeError(
                    f"{where}: {path} has a key of type {type(k).__name__}; dict keys sent "
                    "between stages must be str, int, float, bool or None"
                )
            items.append([k, _walk(v, f"{path}[{k!r}]", where, tensors, specs)])
        return {"d": items}
    raise _bad(obj, path, where)


def _bad(obj: Any, path: str, where: str) -> TypeError:
    return TypeError(
        f"{where}: {path} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        f"cannot be sent to another process; values between pipeline stages may hold only "
        f"{_ALLOWED} (convert NamedTuples/dataclasses to tuples or dicts)"
    )


def decode(meta: bytes, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the value :func:`encode` described, with ``tensors`` in placeholder order."""
    return _build(_parse(meta)["v"], tensors)


@functools.lru_cache(maxsize=1024)
def _parse(meta: bytes) -> Any:
    """The parsed metadata (cached: in the steady state a channel repeats the same few; the
    result is only read, never changed)."""
    return json.loads(meta.decode())


def _build(node: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    if "x" in node:
        return tensors[node["x"]]
    if "l" in node:
        return [_build(v, tensors) for v in node["l"]]
    if "t" in node:
        return tuple(_build(v, tensors) for v in node["t"])
    return {k: _build(v, tensors) for k, v in node["d"]}


@functools.lru_cache(maxsize=1024)
def tensor_specs(meta: bytes) -> tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]:
    """Each tensor's shape, dtype and ``requires_grad`` from ``meta`` (cached)."""
    doc = _parse(meta)
    return tuple((tuple(s["shape"]), getattr(torch, s["dtype"]), s["rg"]) for s in doc["ts"])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's data as a flat uint8 tensor (every dtype travels the same way)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
