"""Non-tensor training state as JSON: generator states as base64, tuples kept as tuples.

The invariant: ``from_json(json.loads(json.dumps(json_value(v)))) == v`` for the values a
manifest holds (numbers, strings, lists, tuples, dicts), and ``decode_rng(encode_rng(s))``
equals ``s`` byte for byte; a tensor is refused (tensors go to safetensors files).
"""

from __future__ import annotations

import base64
from typing import Any

import torch
from torch import Tensor

__all__ = ["decode_rng", "encode_rng", "from_json", "json_value"]


def encode_rng(state: Tensor) -> str:
    """A torch generator state (``uint8`` tensor) as base64 text for JSON."""
    return base64.b64encode(bytes(state.to(torch.uint8).tolist())).decode("ascii")


def decode_rng(text: str) -> Tensor:
    """Inverse of :func:`encode_rng`."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def json_value(value: Any) -> Any:
    """Tuples become ``{"__tuple__": [...]}`` so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [json_value(v) for v in value]}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        raise TypeError("a tensor cannot go into the JSON manifest; pass it as a tensor")
    return value


def from_json(value: Any) -> Any:
    """Inverse of :func:`json_value`."""
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
