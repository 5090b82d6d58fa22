"""The 19-layer float64 MLP and its batches that the distributed tests and the reduction tests
share."""

from __future__ import annotations

import torch
from torch import nn


def mlp(extra: nn.Module | None = None, at: int = 0) -> nn.Sequential:
    """19 float64 layers (Linear, Tanh, Dropout) x 6 + Linear; ``extra`` inserted at ``at``."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.25)]
    layers.append(nn.Linear(8, 3))
    if extra is not None:
        layers.insert(at, extra)
    return nn.Sequential(*layers).double()


def mlp_no_dropout() -> nn.Sequential:
    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    return model


def ignored_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mlp_batch` with the first 5 of 16 targets ignored (-100): with 2 replicas x 2
    micro-batches, replica 0's first micro-batch has no items, its second 3, replica 1's 4
    and 4."""
    x, y = mlp_batch()
    y = y.clone()
    y[:5] = -100
    return x, y


def mlp_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (16,), generator=g
    )
