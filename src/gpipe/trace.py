"""Timelines of pipeline actions: bubble, Chrome/Perfetto trace JSON and a Gantt PNG.

Input is a list of :class:`gpipe.schedules.Event` — from a real run (times in seconds) or from
:func:`gpipe.planner.simulate.simulate` (times in cost units). Everything here is a pure function of that
list; only :func:`to_chrome_trace` (with ``path``) and :func:`plot_timeline` write files, and
nothing prints.

The invariant: :func:`load_chrome_trace` inverts :func:`to_chrome_trace` — a saved trace loads
back to the same events (times up to float rounding), so a saved run can be re-plotted.

Time units: ``"s"`` (seconds, real runs), ``"ms"``, ``"us"``, and ``"unit"`` (simulated cost
units, drawn in Chrome/Perfetto as 1 unit = 1000 µs, i.e. one unit shows as one millisecond).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpipe.schedules import Action, Event

__all__ = [
    "bubble_fraction",
    "busy_per_device",
    "load_chrome_trace",
    "plot_timeline",
    "to_chrome_trace",
]

# Microseconds per time unit, for Chrome trace ``ts``/``dur``.
_US_PER_UNIT: dict[str, float] = {"s": 1e6, "ms": 1e3, "us": 1.0, "unit": 1e3}
_AXIS_LABEL: dict[str, str] = {
    "s": "time (s)",
    "ms": "time (ms)",
    "us": "time (µs)",
    "unit": "time (cost units)",
}
_PROCESS_NAME = "gpipe"
_UNIT_KEY = "gpipe_time_unit"

# Base colour per kind (colour-blind friendly: blue, green, orange).
_KIND_COLOUR: dict[str, tuple[float, float, float]] = {
    "F": (0.20, 0.42, 0.69),
    "B": (0.27, 0.60, 0.33),
    "W": (0.90, 0.52, 0.20),
}
_KIND_NAME = {"F": "forward", "B": "backward", "W": "weight grad"}


# --------------------------------------------------------------------------- checks and numbers


def _checked(events: Iterable[Event], what: str = "nothing to plot") -> list[Event]:
    """``events`` as a list, non-empty, with sane devices and times."""
    evs = list(events)
    if not evs:
        raise ValueError(f"the event list is empty: {what}")
    for e in evs:
        if not isinstance(e, Event):
            raise TypeError(f"expected gpipe.schedules.Event, got {e!r}")
        if e.device < 0:
            raise ValueError(f"{e.action} has a negative device {e.device}")
        if not (math.isfinite(e.start) and math.isfinite(e.end)) or e.end < e.start:
            raise ValueError(
                f"{e.action} on device {e.device} has start={e.start}, end={e.end}; "
                "times must be finite with end >= start"
            )
    return evs


def _num_devices(evs: Sequence[Event], num_devices: int | None) -> int:
    seen = max(e.device for e in evs) + 1
    if num_devices is None:
        return seen
    if num_devices < seen:
        raise ValueError(f"num_devices={num_devices}, but an event ran on device {seen - 1}")
    return num_devices


def _unit_scale(time_unit: str) -> float:
    if time_unit not in _US_PER_UNIT:
        raise ValueError(f"time_unit must be one of {sorted(_US_PER_UNIT)}, got {time_unit!r}")
    return _US_PER_UNIT[time_unit]


def busy_per_device(events: Iterable[Event], num_devices: int | None = None) -> list[float]:
    """Total time each device spent running actions: ``busy[d]`` sums ``end - start``.

    The list has ``num_devices`` entries (default: highest device seen + 1); devices with no
    events are 0.
    """
    evs = _checked(events, "no device was busy")
    busy = [0.0] * _num_devices(evs, num_devices)
    for e in evs:
        busy[e.device] += e.end - e.start
    return busy


def bubble_fraction(events: Iterable[Event], num_devices: int | None = None) -> float:
    """Idle fraction of device-time: ``1 - sum(busy) / (num_devices · span)``.

    ``span`` runs from the earliest start to the latest end over all devices. ``num_devices``
    defaults to the highest device seen + 1; pass it when some device ran nothing. A timeline
    of zero span has no bubble (0.0).
    """
    evs = _checked(events, "no bubble to measure")
    k = _num_devices(evs, num_devices)
    span = max(e.end for e in evs) - min(e.start for e in evs)
    if span <= 0:
        return 0.0
    return 1.0 - sum(busy_per_device(evs, k)) / (k * span)


# --------------------------------------------------------------------------- Chrome trace


def to_chrome_trace(
    events: Iterable[Event],
    path: str | Path | None = None,
    *,
    time_unit: str = "s",
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Chrome / Perfetto trace-event JSON for ``events``; also written to ``path`` if given.

    One complete event (``"ph": "X"``) per action, in the order given: ``name`` like ``"F3"``
    (kind and micro-batch), ``cat`` the kind, ``pid`` 0 (named ``"gpipe"``), ``tid`` the device,
    ``args`` ``{"stage", "microbatch", "kind"}``. ``ts`` and ``dur`` are microseconds: seconds
    are converted with ``time_unit="s"``; simulated cost units use ``time_unit="unit"``, where
    1 unit = 1000 µs (a unit shows as one millisecond). Metadata events name each device's
    thread ``"device d"``, or ``names[d]`` when given. Open the file at https://ui.perfetto.dev
    or chrome://tracing; :func:`load_chrome_trace` reads it back.
    """
    evs = _checked(events, "nothing to export")
    scale = _unit_scale(time_unit)
    k = _num_devices(evs, None)
    names = names or {}
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": _PROCESS_NAME}}
    ]
    for d in range(k):
        meta.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": d,
                "args": {"name": names.get(d, f"device {d}")},
            }
        )
        meta.append(
            {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": d, "args": {"sort_index": d}}
        )
    spans = [
        {
            "name": f"{e.action.kind}{e.action.microbatch}",
            "cat": e.action.kind,
            "ph": "X",
            "pid": 0,
            "tid": e.device,
            "ts": e.start * scale,
            "dur": (e.end - e.start) * scale,
            "args": {
                "stage": e.action.stage,
                "microbatch": e.action.microbatch,
                "kind": e.action.kind,
            },
        }
        for e in evs
    ]
    trace: dict[str, Any] = {
        "traceEvents": meta + spans,
        "displayTimeUnit": "ms",
        "otherData": {_UNIT_KEY: time_unit},
    }
    if path is not None:
        Path(path).write_text(json.dumps(trace))
    return trace


def load_chrome_trace(path: str | Path) -> list[Event]:
    """The events of a trace written by :func:`to_chrome_trace`, in file order.

    Times come back in the unit the trace was written with (recorded in ``otherData``; seconds
    if absent). Complete events without gpipe's ``args`` (e.g. merged from a profiler) are
    skipped; a file with no gpipe actions raises ``ValueError``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if isinstance(data, list):  # the bare-array form of the trace-event format
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path} is not a Chrome trace (no 'traceEvents' list)")
    other = data.get("otherData") or {}
    scale = _unit_scale(other.get(_UNIT_KEY, "s"))
    out: list[Event] = []
    for raw in data["traceEvents"]:
        args = raw.get("args") or {}
        if raw.get("ph") != "X" or not {"stage", "microbatch", "kind"} <= args.keys():
            continue
        ts, dur = float(raw["ts"]), float(raw["dur"])
        action = Action(str(args["kind"]), int(args["stage"]), int(args["microbatch"]))
        out.append(Event(action, int(raw["tid"]), ts / scale, (ts + dur) / scale))
    if not out:
        raise ValueError(
            f"{path} holds no gpipe actions (no 'X' events with stage/microbatch/kind)"
        )
    return out


# --------------------------------------------------------------------------- Gantt plot


def _shade(rgb: tuple[float, float, float], chunk: int, chunks: int) -> tuple[float, ...]:
    """``rgb`` mixed with white: chunk 0 is the full colour, the last chunk the lightest."""
    t = 0.0 if chunks <= 1 else 0.55 * chunk / (chunks - 1)
    return tuple(c + (1.0 - c) * t for c in rgb)


def _text_colour(rgb: Sequence[float]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 0.6 else "white"


def plot_timeline(
    events: Iterable[Event],
    path: str | Path,
    *,
    title: str | None = None,
    num_devices: int | None = None,
    time_unit: str = "s",
) -> None:
    """Draw ``events`` as a Gantt chart PNG at ``path``.

    One lane per device (device 0 on top), one bar per action coloured by kind (F blue,
    B green, W orange), lighter for later virtual stages when a device holds several; the
    micro-batch number is written inside bars wide enough for it; idle time is white. The x-axis
    starts at the earliest event, in seconds (``time_unit="s"``) or cost units (``"unit"``); the
    title carries the bubble fraction. Uses matplotlib's Agg canvas directly, so it works
    headless and leaves pyplot and the global backend alone.
    """
    evs = _checked(events, "nothing to plot")
    _unit_scale(time_unit)
    k = _num_devices(evs, num_devices)
    chunks = max(e.action.stage for e in evs) // k + 1
    kinds = [kd for kd in ("F", "B", "W") if any(e.action.kind == kd for e in evs)]
    t0 = min(e.start for e in evs)
    span = max(e.end for e in evs) - t0
    bubble = bubble_fraction(evs, k)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    # Size: width grows with the busiest lane's bar count, height with the device count.
    per_lane = max(sum(1 for e in evs if e.device == d) for d in range(k))
    show_chunks = 1 < chunks <= 4
    legend_rows = chunks if show_chunks else 1
    width = min(max(8.0, 5.0 + 0.07 * per_lane), 22.0)
    lane_h = 0.42 if k <= 8 else 0.32
    left, right, top = 0.95, 0.25, 0.45
    bottom = 0.6 + 0.2 * (legend_rows + (1 if chunks > 1 else 0)) + 0.1
    height = top + bottom + lane_h * k
    dpi = 110
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height
    )
    ax = fig.add_subplot()

    starts = [e.start - t0 for e in evs]
    widths = [e.end - e.start for e in evs]
    colours = [_shade(_KIND_COLOUR[e.action.kind], e.action.stage // k, chunks) for e in evs]
    # White edges separate neighbouring bars, unless bars are so thin the edges would hide them.
    ax_px = (width - left - right) * dpi
    typical_px = sorted(widths)[len(widths) // 2] / span * ax_px if span > 0 else 0.0
    ax.barh(
        [e.device for e in evs],
        widths,
        left=starts,
        height=0.8,
        color=colours,
        edgecolor="white",
        linewidth=0.4 if typical_px >= 6 else 0.0,
    )

    # Micro-batch labels, only where the bar is wide enough for the text.
    fontsize = 7 if k <= 8 else 6
    char_px = 0.62 * fontsize * dpi / 72
    # Sized for the longest label, so bars of one width are all labelled or all left bare.
    need_px = char_px * len(str(max(e.action.microbatch for e in evs))) + 4
    for e, x, w, c in zip(evs, starts, widths, colours):
        label = str(e.action.microbatch)
        if span > 0 and w / span * ax_px >= need_px:
            ax.text(
                x + w / 2,
                e.device,
                label,
                ha="center",
                va="center",
                fontsize=fontsize,
                color=_text_colour(c),
                clip_on=True,
            )

    ax.set_ylim(k - 0.5, -0.5)  # device 0 on top
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"device {d}" for d in range(k)], fontsize=8)
    ax.set_xlim(0, span if span > 0 else 1.0)
    ax.set_xlabel(_AXIS_LABEL[time_unit])
    ax.tick_params(axis="x", labelsize=8)
    for d in range(k - 1):
        ax.axhline(d + 0.5, color="0.85", linewidth=0.6)
    ax.grid(axis="x", color="0.92", linewidth=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    split = "W" in kinds
    handles = []
    for kd in kinds:  # one legend column per kind, one row per chunk
        for c in range(chunks if show_chunks else 1):
            name = "backward (input grad)" if kd == "B" and split else _KIND_NAME[kd]
            label = f"{kd} {name}" + (f" · chunk {c}" if show_chunks else "")
            colour = _shade(_KIND_COLOUR[kd], c, chunks) if show_chunks else _KIND_COLOUR[kd]
            handles.append(Patch(facecolor=colour, label=label))
    legend_title = None
    if chunks > 1 and not show_chunks:
        legend_title = f"lighter = later virtual stage ({chunks} per device)"
    elif show_chunks:
        round_robin = all(e.action.stage % k == e.device for e in evs)
        legend_title = (
            f"chunk c = virtual stage c·{k} + device"
            if round_robin
            else "chunk c = the device's c-th stage in model order"
        )
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -(0.5 / (lane_h * k))),
        ncol=len(kinds),
        fontsize=8,
        title=legend_title,
        title_fontsize=8,
        frameon=False,
    )

    unit = "s" if time_unit == "s" else ("units" if time_unit == "unit" else time_unit)
    head = title or "pipeline timeline"
    ax.set_title(
        f"{head} — bubble {bubble:.1%} · span {span:.4g} {unit} · {k} devices", fontsize=10
    )
    fig.savefig(path, format="png")
