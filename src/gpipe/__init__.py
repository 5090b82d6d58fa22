"""gpipe: GPipe and beyond — pipeline model parallelism for PyTorch.

The public face of the package; everything is defined in its own module, in the package of its
responsibility (``docs/architecture.md`` draws the layers). The modules users reach by their
earlier, flat names (``gpipe.microbatch``, ``gpipe.rng``, ``gpipe.compiling``, ...) stay
reachable under those names: :data:`_PUBLIC_MODULES` maps each to its home.
"""

import importlib
import sys

from gpipe import capture, schedules, trace
from gpipe.base import compiling, microbatch
from gpipe.base.microbatch import merge, split
from gpipe.core import precision
from gpipe.core.auto import Auto
from gpipe.core.executor import StageError
from gpipe.core.reduction import count_items
from gpipe.core.reference import reference_forward, reference_step
from gpipe.dist.pipe import DistributedPipe
from gpipe.local import autotune
from gpipe.local.pipe import Partition, Pipe
from gpipe.planner.autoplan import Configuration, NoFitError, autoplan
from gpipe.planner.balance import balance, balance_by_flops, balance_by_memory, balance_by_time
from gpipe.planner.simulate import SimResult, simulate
from gpipe.schedules import Action, Schedule, ScheduleError
from gpipe.stage import rng

__version__ = "0.1.0"

# Documented module paths of the flat layout -> their home now; ``import gpipe.rng`` keeps working.
_PUBLIC_MODULES = {
    "compiling": "gpipe.base.compiling",
    "microbatch": "gpipe.base.microbatch",
    "rng": "gpipe.stage.rng",
    "precision": "gpipe.core.precision",
    "reduction": "gpipe.core.reduction",
    "autotune": "gpipe.local.autotune",
    "data": "gpipe.train.data",
}
for _old, _new in _PUBLIC_MODULES.items():
    globals()[_old] = sys.modules.setdefault(f"gpipe.{_old}", importlib.import_module(_new))

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
    "autotune",
    "balance",
    "balance_by_flops",
    "balance_by_memory",
    "balance_by_time",
    "capture",
    "compiling",
    "count_items",
    "merge",
    "microbatch",
    "precision",
    "reference_forward",
    "reference_step",
    "rng",
    "schedules",
    "simulate",
    "split",
    "trace",
]
