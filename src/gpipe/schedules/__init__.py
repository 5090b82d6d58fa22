"""Pipeline schedules as data.

A schedule says, for every device of the pipeline, the ordered list of units it runs in one
training step: ``F`` (forward of one micro-batch through one stage), ``B`` (backward; the full
backward, or only the input gradient when the schedule also has ``W`` actions), ``W`` (the
weight-gradient half of a split backward) and :class:`Overlap` (a forward and a backward of
other micro-batches issued together). Everything else in gpipe interprets this data: the
validator proves it can run, the simulator times it, and both runtimes execute it.

The invariant kept here: a :class:`Schedule` that exists has been validated — every
(kind, stage, micro-batch) occurs exactly once, on the device its placement names, and the
dependencies can be met in the listed order without deadlock.

Modules: :mod:`~gpipe.schedules.ir` (the types and placements), :mod:`~gpipe.schedules.codes`
(integer codes and the replay), :mod:`~gpipe.schedules.validate`,
:mod:`~gpipe.schedules.named` (the registry, GPipe, 1F1B, interleaved),
:mod:`~gpipe.schedules.zero_bubble` (ZB-H1, ZB-H2, ZB-V, interleaved zero bubble),
:mod:`~gpipe.schedules.dualpipe` (DualPipeV) and :mod:`~gpipe.schedules.spec` (a pipe's ``schedule=`` argument).
"""

from gpipe.schedules import dualpipe as _dualpipe  # noqa: F401  (registers dualpipe-v)
from gpipe.schedules import zero_bubble as _zero_bubble  # noqa: F401  (registers zb-*)
from gpipe.schedules.ir import (
    KIND_WORDS,
    KINDS,
    Action,
    Event,
    Overlap,
    Schedule,
    ScheduleError,
    device_of,
    round_robin,
    v_shape,
)
from gpipe.schedules.named import (
    available,
    get,
    interleaving,
    placement_of,
    register,
    unregister,
)
from gpipe.schedules.spec import ScheduleSpec
from gpipe.schedules.validate import custom, dependencies, execution_order, validate

__all__ = [
    "KINDS",
    "KIND_WORDS",
    "Action",
    "Event",
    "Overlap",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "available",
    "custom",
    "dependencies",
    "device_of",
    "execution_order",
    "get",
    "interleaving",
    "placement_of",
    "register",
    "round_robin",
    "unregister",
    "v_shape",
    "validate",
]
