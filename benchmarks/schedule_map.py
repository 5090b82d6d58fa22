"""Which schedule wins where: every named schedule simulated over K, M and two cost profiles.

The simulator (:mod:`gpipe.planner.simulate`) replays each schedule with per-stage costs; this script
tabulates, for K ∈ {2, 4, 8} devices and M ∈ {K, 2K, 4K} micro-batches, each schedule's step
time relative to 1F1B's and its peak live activations per device, in whole-device units (one
micro-batch of a device's whole share of the model; a chunk of a V-stage schedule counts 1/V).

Two cost profiles, per micro-batch and device, relative to the forward F:

* ``balanced``: a whole backward costs 2F and splits into B = W = F at no extra cost — the
  zero-bubble paper's setting, close to large matrix products on a GPU;
* ``cpu``: what ``benchmarks/local_throughput.py`` measures on the flagship LM on this
  project's 2-core CPU: a whole backward ≈ 1.07 F (attention and dropout make the forward
  heavy), and split, B ≈ 0.76 F and W ≈ 0.38 F — B + W ≈ 1.14 F, 6% more than the whole
  backward, because W reads the kept output gradients again from memory (a backward the
  schedule leaves whole costs 1.07 F: ``simulate(..., split_overhead=...)``).

Communication is free and every stage costs the same, so the table isolates what the schedule
itself does. ``python benchmarks/schedule_map.py [--profile balanced|cpu|both]``.
"""

from __future__ import annotations

import argparse

from gpipe import schedules
from gpipe.planner.simulate import simulate

PROFILES = {
    # (forward, whole backward, B of a split backward, W of a split backward)
    "balanced": (1.0, 2.0, 1.0, 1.0),
    "cpu": (1.0, 1.07, 0.76, 0.38),
}


def row(name: str, k: int, m: int, profile: str) -> tuple[float, float, float]:
    """(makespan, bubble, peak activations in whole-device units) of ``name`` at K, M."""
    f, full, b, w = PROFILES[profile]
    v = 2 if name in schedules.interleaving() else None  # zb-v, dualpipe-v: always 2
    sched = schedules.get(name, k, m, virtual_stages=v)
    vv = sched.virtual_stages
    n = sched.num_stages
    if sched.split_backward:  # a split costs (b + w) / full - 1 more than a whole backward
        share = w * full / (b + w)  # W's share of the whole backward
        res = simulate(sched, [f / vv] * n, [full / vv] * n, weight_costs=[share / vv] * n,
                       split_overhead=(b + w) / full - 1)  # fmt: skip
    else:
        res = simulate(sched, [f / vv] * n, [full / vv] * n)
    return res.makespan, res.bubble, max(res.peak_activations) / vv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="both", choices=[*PROFILES, "both"])
    ap.add_argument("--devices", default="2,4,8")
    args = ap.parse_args()
    names = schedules.available()
    for profile in PROFILES if args.profile == "both" else [args.profile]:
        f, full, b, w = PROFILES[profile]
        print(f"\n### profile {profile}: F={f}, whole backward={full}, split B={b} + W={w}\n")
        print("step time relative to 1F1B's at the same K, M (peak activations, device units)\n")
        print("| K | M | " + " | ".join(names) + " |")
        print("| ---: | ---: |" + " ---: |" * len(names))
        for k in (int(x) for x in args.devices.split(",")):
            for m in (k, 2 * k, 4 * k):
                base = row("1f1b", k, m, profile)[0]
                cells = []
                for name in names:
                    t, _, peak = row(name, k, m, profile)
                    cells.append(f"{t / base:.2f} ({peak:g})")
                print(f"| {k} | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
