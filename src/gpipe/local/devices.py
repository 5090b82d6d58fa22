"""Where a one-process pipe's stages sit: its devices, and the ``partitions`` report.

``gpipe.Pipe`` runs one worker thread per pipeline device; this module decides which devices
those are (from ``devices=``, ``stages=``, ``balance=`` and the schedule) and describes, after
the cut, which layers each stage holds. Where stage ``s`` runs among those devices is the
schedule's fact (``ScheduleSpec.placement``, stage → device).

The invariant: a pipe gets exactly one device per pipeline device, K agrees with every option
that implies it (or the pipe is refused, naming both numbers), and without ``devices=`` the
stages go to the GPUs whenever there are any — never silently to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gpipe.base import options
from gpipe.local.streams import indexed

if TYPE_CHECKING:
    from gpipe.stage.stage import Stage

__all__ = ["Partition", "default_devices", "partitions", "pipe_devices"]


@dataclass(frozen=True)
class Partition:
    """Which layers one stage holds, where, and what they weigh."""

    stage: int
    device: torch.device
    layers: tuple[str, ...]
    num_parameters: int
    flops: int | None = None

    def __str__(self) -> str:
        fl = f", {self.flops / 1e9:.3g} GFLOP fwd" if self.flops is not None else ""
        names = ", ".join(self.layers)
        return (
            f"stage {self.stage} on {self.device}: [{names}] ({self.num_parameters:,} params{fl})"
        )


def default_devices(k: int | None) -> list[torch.device]:
    """Where K stages run when no ``devices`` are given: on the GPUs whenever there are any
    (K stages over n GPUs go to ``cuda:(s mod n)``), else K CPU workers. A pipe never falls
    back to the CPU silently; ask for it with ``devices=["cpu"] * K``."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        return [torch.device("cuda", i % n) for i in range(k or n)]
    return [torch.device("cpu")] * (k or 1)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def pipe_devices(
    devices: Sequence[torch.device | str | int] | torch.device | str | int | None,
    stages: int | None,
    balance: Sequence[int] | None,
    schedule_devices: int | None,
    virtual_stages: int,
) -> list[torch.device]:
    """One device per pipeline device; K is ``stages``, else ``len(balance) // V``, else the
    number of devices (given, or :func:`default_devices`). ``schedule_devices`` is the K a
    built schedule was made for (``None`` for a schedule name)."""
    k_balance = len(balance) // virtual_stages if _is_list(balance) else None
    if devices is None:
        devs = default_devices(stages or k_balance or schedule_devices)
    else:
        if isinstance(devices, (str, int, torch.device)):
            devices = [devices]
        devs = [indexed(options.device(d)) for d in devices]  # "cuda" is cuda:<current>
    k = stages if stages is not None else (k_balance if k_balance is not None else len(devs))
    if k < 1:
        raise ValueError(f"stages must be >= 1, got {k}")
    if schedule_devices is not None and schedule_devices != k:
        raise ValueError(
            f"the given schedule is built for {schedule_devices} devices but stages={k}"
        )
    if len(devs) != k:
        raise ValueError(
            f"got {len(devs)} devices for {k} stages; pass one device per stage "
            f"(devices=[...] of length {k})"
        )
    return devs


def partitions(
    stages: Sequence[Stage], layer_names: Sequence[str], flops: Sequence[int] | None
) -> list[Partition]:
    """The :class:`Partition` of each stage: its layers' names (``layer_names`` by global
    layer index), device, parameter count and, when balanced by FLOPs, its forward FLOPs."""
    return [
        Partition(
            stage=st.index,
            device=st.device,
            layers=tuple(layer_names[i] for i, _ in st.layers),
            num_parameters=sum(p.numel() for p in st.parameters()),
            flops=flops[st.index] if flops else None,
        )
        for st in stages
    ]
