"""The arithmetic of a training step: fp32, bf16 autocast, or fp16 autocast with a dynamic loss
scale that every stage of the pipeline applies alike.

fp16's range is narrow: small gradients underflow to zero. So the loss is multiplied by a scale
``S`` — inside the loss function, since ``pipe.step`` runs the backward itself — the gradients
are divided by ``S`` before clipping and the optimizer step, and ``S`` adapts: a step whose
gradient norm is not finite (an overflow anywhere) is skipped and ``S`` halves; after
``growth_interval`` finite steps in a row it doubles. The norm tested is the pipeline's global
one (``clip_grad_norm_`` reduces it over every stage, and every rank of a distributed run
computes the same value), so every stage skips the same steps. A check per process, as
``torch.amp.GradScaler`` makes it, would let one stage step while another skips: the stages
would no longer be one model.

The invariant: a step taken under fp16 uses the gradients of the unscaled loss (up to fp16
rounding), every stage takes or skips it alike, and the scale is saved with the checkpoint, so a
resumed run continues with the scale it had.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "bf16", "fp16")

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's defaults
GROWTH_INTERVAL = 2000
MIN_SCALE = 2.0**-24  # below this fp16's smallest subnormal: the loss itself is not finite


class Precision:
    """One run's precision on ``device_type`` (``"cpu"``, ``"cuda"``): :meth:`autocast`
    around forward and backward, :meth:`loss_fn` for ``pipe.step``, and after it
    :meth:`unscale`, the clip, then :meth:`update` to learn whether to step."""

    def __init__(self, name: str, device_type: str, growth_interval: int = GROWTH_INTERVAL):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name, self.device_type = name, device_type
        self.growth_interval = growth_interval
        self.scale = INIT_SCALE if name == "fp16" else 1.0
        self.good_steps = 0  # finite steps since the scale last changed

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of a step (none for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def loss_fn(self, fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
        """``fn`` with its loss multiplied by the current scale (``fn`` itself unless fp16)."""
        if not self.scaled:
            return fn
        scale = self.scale

        def scaled(out: Any, target: Any) -> torch.Tensor:
            return fn(out, target).float() * scale

        return scaled

    def loss_value(self, loss: torch.Tensor) -> float:
        """The step's loss, unscaled."""
        return float(loss) / self.scale

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Divide this process's gradients by the scale (before the clip sees them)."""
        if not self.scaled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, grad_norm: float) -> bool:
        """After the clip: whether to take the optimizer step (always, unless fp16 met a
        non-finite global gradient norm), adapting the scale."""
        if not self.scaled:
            return True
        if not math.isfinite(grad_norm):
            self.scale /= 2.0
            self.good_steps = 0
            if self.scale < MIN_SCALE:
                raise FloatingPointError(
                    f"fp16's loss scale fell to {self.scale:g}: the gradients are not finite "
                    "at any scale; lower --lr, or use --precision bf16 or fp32"
                )
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return True

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps (the scale and its count of finite steps)."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (nothing saved: keep the start)."""
        if state and self.scaled:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
