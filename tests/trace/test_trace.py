"""Timelines: bubble arithmetic on hand-built timelines, Chrome trace export and its round trip,
and the Gantt PNG (written headless, readable back, no pyplot state touched)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpipe.planner.simulate import simulate
from gpipe.schedules import Action, Event, get
from gpipe.trace import (
    bubble_fraction,
    busy_per_device,
    load_chrome_trace,
    plot_timeline,
    to_chrome_trace,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ev(kind: str, stage: int, mb: int, device: int, start: float, end: float) -> Event:
    return Event(Action(kind, stage, mb), device, start, end)


def fill_drain_2x2() -> list[Event]:
    """GPipe, K=2 devices, M=2 micro-batches, F = B = 1 unit.

    device 0: F0 [0,1] F1 [1,2] ....idle.... B1 [4,5] B0 [5,6]
    device 1: ..idle.. F0 [1,2] F1 [2,3] B1 [3,4] B0 [4,5] ..idle..
    Span 6, each device busy 4: bubble = 1 - 8/12 = 1/3 (= (K-1)/(M+K-1)).
    """
    return [
        ev("F", 0, 0, 0, 0, 1),
        ev("F", 0, 1, 0, 1, 2),
        ev("F", 1, 0, 1, 1, 2),
        ev("F", 1, 1, 1, 2, 3),
        ev("B", 1, 1, 1, 3, 4),
        ev("B", 1, 0, 1, 4, 5),
        ev("B", 0, 1, 0, 4, 5),
        ev("B", 0, 0, 0, 5, 6),
    ]


def gpipe_4x8() -> list[Event]:
    """GPipe fill-drain by hand, K=4, M=8, F = 1 and B = 2 units."""
    k, m = 4, 8
    out = [ev("F", d, i, d, d + i, d + i + 1) for d in range(k) for i in range(m)]
    last_f = (k - 1) + m  # end of the last forward on the last device
    for d in range(k):
        for r, i in enumerate(reversed(range(m))):
            start = last_f + 2 * r + 2 * (k - 1 - d)
            out.append(ev("B", d, i, d, start, start + 2))
    return out


def split_backward_v2() -> list[Event]:
    """K=2 devices, V=2 virtual stages each (stages 0..3, stage s on device s % 2), M=2, with W.

    Each device runs its actions back to back with a 0.5 idle gap after every third one.
    """
    out: list[Event] = []
    for d in range(2):
        t = 0.25 * d
        acts = [Action("F", c * 2 + d, i) for c in range(2) for i in range(2)]
        acts += [Action(kd, c * 2 + d, i) for c in (1, 0) for i in range(2) for kd in ("B", "W")]
        for n, a in enumerate(acts):
            dur = 1.0 if a.kind == "F" else 0.75
            out.append(Event(a, d, t, t + dur))
            t += dur + (0.5 if n % 3 == 2 else 0.0)
    return out


# --------------------------------------------------------------------------- bubble


def test_bubble_of_fill_drain_is_exact() -> None:
    events = fill_drain_2x2()
    assert busy_per_device(events) == [4.0, 4.0]
    assert bubble_fraction(events) == pytest.approx(1 / 3, abs=1e-12)


def test_bubble_of_packed_timeline_is_zero() -> None:
    events = [ev("F", d, i, d, i, i + 1) for d in range(2) for i in range(3)]
    assert bubble_fraction(events) == 0.0


def test_bubble_counts_idle_devices_given_num_devices() -> None:
    events = [ev("F", 0, i, 0, i, i + 1) for i in range(3)]
    assert bubble_fraction(events, num_devices=3) == pytest.approx(2 / 3)
    assert busy_per_device(events, num_devices=3) == [3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="ran on device 1"):
        bubble_fraction([ev("F", 1, 0, 1, 0, 1)], num_devices=1)


def test_bubble_uses_span_not_zero_origin() -> None:
    shifted = [Event(e.action, e.device, e.start + 100.0, e.end + 100.0) for e in fill_drain_2x2()]
    assert bubble_fraction(shifted) == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved"])
def test_bubble_agrees_with_simulator(name: str) -> None:
    r = simulate(get(name, 4, 8), 1.0, 2.0, comm_cost=0.1)
    assert bubble_fraction(r.events, 4) == pytest.approx(r.bubble, abs=1e-12)


def test_bad_events_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        bubble_fraction([])
    with pytest.raises(ValueError, match="end >= start"):
        bubble_fraction([ev("F", 0, 0, 0, 2.0, 1.0)])


# --------------------------------------------------------------------------- Chrome trace


def test_chrome_trace_events_in_microseconds(tmp_path: Path) -> None:
    events = [Event(e.action, e.device, e.start * 1e-3, e.end * 1e-3) for e in fill_drain_2x2()]
    path = tmp_path / "trace.json"
    trace = to_chrome_trace(events, path, names={1: "cuda:1"})
    spans = [t for t in trace["traceEvents"] if t["ph"] == "X"]
    assert len(spans) == len(events)
    for t, e in zip(spans, events, strict=True):
        assert t["tid"] == e.device
        assert t["pid"] == 0
        assert t["ts"] == pytest.approx(e.start * 1e6)
        assert t["dur"] == pytest.approx((e.end - e.start) * 1e6)
        assert t["name"] == f"{e.action.kind}{e.action.microbatch}"
        assert t["args"] == {
            "stage": e.action.stage,
            "microbatch": e.action.microbatch,
            "kind": e.action.kind,
        }
    assert spans[0]["ts"] == 0.0 and spans[0]["dur"] == pytest.approx(1000.0)  # 1 ms
    threads = {
        t["tid"]: t["args"]["name"] for t in trace["traceEvents"] if t["name"] == "thread_name"
    }
    assert threads == {0: "device 0", 1: "cuda:1"}
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))


def test_chrome_trace_cost_units_are_milliseconds() -> None:
    events = split_backward_v2()
    trace = to_chrome_trace(events, time_unit="unit")
    spans = [t for t in trace["traceEvents"] if t["ph"] == "X"]
    assert [t["dur"] for t in spans] == [pytest.approx((e.end - e.start) * 1000) for e in events]
    with pytest.raises(ValueError, match="time_unit"):
        to_chrome_trace(events, time_unit="fortnights")


@pytest.mark.parametrize("unit", ["s", "unit"])
def test_chrome_trace_round_trips(tmp_path: Path, unit: str) -> None:
    events = [*split_backward_v2(), Event(Action("F", 5, 3), 1, 1234.567, 1234.9)]
    path = tmp_path / "t.json"
    to_chrome_trace(events, path, time_unit=unit)
    back = load_chrome_trace(path)
    assert [(e.action, e.device) for e in back] == [(e.action, e.device) for e in events]
    for b, e in zip(back, events, strict=True):
        assert b.start == pytest.approx(e.start, rel=1e-12, abs=1e-12)
        assert b.end == pytest.approx(e.end, rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("FBW"),
            st.integers(0, 7),
            st.integers(0, 63),
            st.floats(0, 1e4, allow_nan=False),
            st.floats(0, 10, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, rows: list) -> None:
    events = [Event(Action(k, s, m), s % 4, t, t + d) for k, s, m, t, d in rows]
    path = tmp_path_factory.mktemp("rt") / "t.json"
    to_chrome_trace(events, path)
    back = load_chrome_trace(path)
    assert [(e.action, e.device) for e in back] == [(e.action, e.device) for e in events]
    assert [e.start for e in back] == pytest.approx([e.start for e in events], rel=1e-9)
    assert [e.end for e in back] == pytest.approx([e.end for e in events], rel=1e-9)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "matmul", "ts": 0}]}))
    with pytest.raises(ValueError, match="no gpipe actions"):
        load_chrome_trace(other)
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_chrome_trace(junk)


# --------------------------------------------------------------------------- Gantt PNG


def _check_png(path: Path, min_w: int = 500, min_h: int = 150) -> tuple[int, int]:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    h, w = mpimg.imread(path).shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 3000
    return w, h


def test_plot_gpipe_timeline(tmp_path: Path) -> None:
    path = tmp_path / "gpipe.png"
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    plot_timeline(gpipe_4x8(), path, title="GPipe K=4 M=8", time_unit="unit")
    w, h = _check_png(path)
    assert w > h  # a timeline is wide
    if not pyplot_loaded:  # the plotter never goes through pyplot's global state
        assert "matplotlib.pyplot" not in sys.modules


def test_plot_split_backward_virtual_stages(tmp_path: Path) -> None:
    path = tmp_path / "zb.png"
    plot_timeline(split_backward_v2(), path, num_devices=2)
    _check_png(path)


def test_plot_height_grows_with_devices(tmp_path: Path) -> None:
    small, big = tmp_path / "k2.png", tmp_path / "k16.png"
    plot_timeline(simulate(get("1f1b", 2, 8)).events, small, time_unit="unit")
    plot_timeline(simulate(get("1f1b", 16, 64)).events, big, time_unit="unit")
    assert _check_png(big)[1] > _check_png(small)[1]


def test_plot_rejects_empty_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_timeline([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="time_unit"):
        plot_timeline(fill_drain_2x2(), tmp_path / "x.png", time_unit="hours")
    assert not (tmp_path / "empty.png").exists()
