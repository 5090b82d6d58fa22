"""The run folder of ``gpipe train``: metrics, trace files, and the earlier run's files.

The invariant: a fresh run never loses what an earlier run left in its ``--out`` folder. The
earlier run's ``metrics.jsonl`` and ``config.json`` are kept (:class:`EarlierRunFiles`) and
either follow its checkpoints into ``checkpoints.old-<timestamp>`` once this run has saved its
first checkpoint, or are put back in place if this run stops before that.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

__all__ = ["EarlierRunFiles", "Metrics", "write_trace"]


class EarlierRunFiles:
    """An earlier run's ``metrics.jsonl`` and ``config.json``, read before this run overwrites
    them, so that they go along with that run's checkpoints or come back."""

    NAMES = ("metrics.jsonl", "config.json")

    def __init__(self, out: Path) -> None:
        self.out = out
        self.saved = {n: (out / n).read_bytes() for n in self.NAMES if (out / n).is_file()}

    def follow(self, aside: Path) -> None:
        """Write the files next to the earlier checkpoints, now in ``aside``."""
        for name, data in self.saved.items():
            (aside / name).write_bytes(data)
        self.saved = {}

    def restore(self) -> None:
        """Put the files back in the run folder (this run never saved a checkpoint)."""
        for name, data in self.saved.items():
            (self.out / name).write_bytes(data)
        self.saved = {}


class Metrics:
    """metrics.jsonl (and TensorBoard when installed) for one run folder."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:  # drop the records of steps after the checkpoint (re-run after a crash)
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
            self.path.write_text("".join(kept))
        self.file = self.path.open("a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        row = {k: v for k, v in rec.items() if k != "events"}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{rec['kind']}/{key}", value, rec["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def write_trace(rec: dict[str, Any], out: Path) -> str:
    """Write a trace record (every device's events on one clock) as ``OUT/trace.json``
    (Perfetto) and ``OUT/timeline.png``; return where, for the log line."""
    from gpipe.trace import plot_timeline, to_chrome_trace

    events, k = rec["events"], rec["num_devices"]
    lanes = {int(d): str(name) for d, name in (rec.get("lanes") or {}).items()}
    to_chrome_trace(events, out / "trace.json", time_unit="s", names=lanes or None)
    plot_timeline(
        events,
        out / "timeline.png",
        title=f"gpipe train: step {rec['step']}",
        num_devices=k,
        time_unit="s",
    )
    return f"{out / 'trace.json'} and {out / 'timeline.png'}"
