"""``ScheduleSpec``: a pipe's ``schedule=`` argument, resolved once per micro-batch count.

The invariant: :meth:`ScheduleSpec.placement` — what a pipe uses to place its stages at
construction, before any batch fixes ``M`` — is the placement of every schedule
:meth:`ScheduleSpec.get` later returns.
"""

from __future__ import annotations

from gpipe.schedules.actions import checked_int
from gpipe.schedules.ir import Schedule
from gpipe.schedules.named import (
    get,
    lookup,
    needs_interleaving,
    placement_of,
    resolve_virtual,
)

__all__ = ["ScheduleSpec"]


class ScheduleSpec:
    """A pipe's ``schedule`` argument — a name or a built :class:`Schedule` — resolved once
    per micro-batch count. Both runtimes' pipes hold one.

    ``virtual_stages`` applies to ``"interleaved"`` and ``"interleaved-zb"`` (default 2);
    ``zb-v`` and ``dualpipe-v`` have two stages per device; ``num_devices`` is fixed only when a
    built schedule was given.
    """

    def __init__(self, schedule: str | Schedule, virtual_stages: int | None = None) -> None:
        self._cache: dict[tuple[int, int], Schedule] = {}
        if isinstance(schedule, Schedule):
            if virtual_stages is not None and virtual_stages != schedule.virtual_stages:
                raise ValueError(
                    f"virtual_stages={virtual_stages} but the given schedule is built with "
                    f"{schedule.virtual_stages}; drop virtual_stages= or rebuild the schedule"
                )
            self.fixed: Schedule | None = schedule
            self.name = schedule.name
            self.virtual_stages = schedule.virtual_stages
            self.num_devices: int | None = schedule.num_devices
            return
        self.fixed = None
        self.name, entry = lookup(schedule)
        if virtual_stages is not None:
            virtual_stages = checked_int(virtual_stages, "virtual_stages", 1)
        if virtual_stages not in (None, 1) and not entry.virtual and entry.fixed_virtual is None:
            raise ValueError(
                f"virtual_stages={virtual_stages} needs {needs_interleaving()}, not {schedule!r}"
            )
        self.virtual_stages = resolve_virtual(self.name, virtual_stages)
        self.num_devices = None

    def placement(self, num_devices: int) -> tuple[int, ...]:
        """Stage → device for ``num_devices`` devices: ``placement[s]`` holds stage ``s`` of
        the ``num_devices · virtual_stages`` stages (default ``s % K``; V-shaped schedules put
        ``d`` and ``2K-1-d`` on device ``d``)."""
        if self.fixed is not None:
            if self.fixed.num_devices != num_devices:
                raise ValueError(
                    f"the given schedule is built for {self.fixed.num_devices} devices but the "
                    f"pipeline has {num_devices}; build it for {num_devices} devices"
                )
            return self.fixed.placement
        return placement_of(self.name, num_devices, self.virtual_stages)

    def get(self, num_devices: int, num_microbatches: int) -> Schedule:
        """The schedule for this many devices and micro-batches (validated, cached)."""
        if self.fixed is not None:
            if self.fixed.num_devices != num_devices:
                raise ValueError(
                    f"the given schedule is built for {self.fixed.num_devices} devices but the "
                    f"pipeline has {num_devices}; build it for {num_devices} devices"
                )
            if self.fixed.num_microbatches != num_microbatches:
                raise ValueError(
                    f"the given schedule is built for {self.fixed.num_microbatches} "
                    f"micro-batches but this batch splits into {num_microbatches}"
                )
            return self.fixed
        key = (num_devices, num_microbatches)
        if key not in self._cache:
            self._cache[key] = get(
                self.name, num_devices, num_microbatches, virtual_stages=self.virtual_stages
            )
        return self._cache[key]
