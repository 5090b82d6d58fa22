"""How long building, validating and replaying a large schedule takes, per named schedule.

For each schedule: ``get(name, K, M)`` (build and validate, including the deadlock replay)
and ``simulate`` (the timed replay and peak activations), medians of several repeats, at
K = 64 devices and M = 512 micro-batches by default. The planner simulates hundreds of
configurations, so this is the number that decides how far it can search.

Times are the process's CPU time (``time.process_time``), which a machine shared with other
jobs does not inflate; the wall-clock total is printed beside it.

    python benchmarks/simulator_speed.py            # --quick for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

from gpipe import schedules
from gpipe.planner.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--schedules", nargs="*", default=None, help="default: every schedule")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    k, m = (8, 64) if args.quick else (args.devices, args.microbatches)
    reps = 2 if args.quick else args.repeats
    print(f"K={k} M={m}, median of {reps} repeats (seconds)")
    print("| schedule | actions | get (build + validate) | simulate | total CPU | total wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.schedules or schedules.available():
        builds, sims, walls = [], [], []
        n_actions = 0
        for _ in range(reps):
            w0, t0 = time.perf_counter(), time.process_time()
            s = schedules.get(name, k, m)
            t1 = time.process_time()
            simulate(s, 1.0, 2.0)
            t2, w1 = time.process_time(), time.perf_counter()
            builds.append(t1 - t0)
            sims.append(t2 - t1)
            walls.append(w1 - w0)
            n_actions = sum(len(u.parts) for acts in s.actions for u in acts)
        b, r = statistics.median(builds), statistics.median(sims)
        w = statistics.median(walls)
        print(f"| {name} | {n_actions} | {b:.3f} | {r:.3f} | {b + r:.3f} | {w:.3f} |")


if __name__ == "__main__":
    main()
