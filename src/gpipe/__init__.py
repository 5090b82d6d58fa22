"""gpipe: GPipe and beyond — pipeline model parallelism for PyTorch.

The public face of the package; everything is defined in its own module.
"""

from gpipe import capture, microbatch, rng, schedules, trace
from gpipe.auto import Auto
from gpipe.autoplan import Configuration, NoFitError, autoplan
from gpipe.balance import balance, balance_by_flops, balance_by_memory, balance_by_time
from gpipe.distributed import DistributedPipe
from gpipe.microbatch import merge, split
from gpipe.pipe import Partition, Pipe
from gpipe.reduction import count_items
from gpipe.reference import reference_forward, reference_step
from gpipe.runtime.executor import StageError
from gpipe.schedules import Action, Schedule, ScheduleError
from gpipe.simulate import SimResult, simulate

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Auto",
    "Configuration",
    "DistributedPipe",
    "NoFitError",
    "Partition",
    "Pipe",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "StageError",
    "autoplan",
    "balance",
    "balance_by_flops",
    "balance_by_memory",
    "balance_by_time",
    "capture",
    "count_items",
    "merge",
    "microbatch",
    "reference_forward",
    "reference_step",
    "rng",
    "schedules",
    "simulate",
    "split",
    "trace",
]
