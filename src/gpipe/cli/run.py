"""The run folder of ``gpipe train``: one run at a time, metrics, trace files, and the earlier
run's files.

The invariants: one ``gpipe train`` at a time writes into a ``--out`` folder
(:class:`RunLock`: an advisory ``flock`` on ``OUT/.gpipe-train.lock``, held by the one process
that runs or launches the training, released by the kernel when that process dies, so a
crashed run's lock never blocks the next run); and a fresh run never loses what an earlier run
left in its ``--out`` folder. The earlier run's ``metrics.jsonl`` and ``config.json`` are kept
(:class:`EarlierRunFiles`) and either follow its checkpoints into
``checkpoints.old-<timestamp>`` once this run has saved its first checkpoint, or are put back
in place if this run stops before that.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from gpipe.cli.base import UsageError

__all__ = [
    "LOCKED_ENV",
    "EarlierRunFiles",
    "Metrics",
    "RunLock",
    "interrupted_line",
    "write_trace",
]

LOCKED_ENV = "GPIPE_RUN_LOCKED"
"""Set by the ``--runtime dist`` launcher, which holds the run folder's lock, for its ranks."""


class RunLock:
    """The one ``gpipe train`` writing into run folder ``out``: an exclusive, non-blocking
    ``flock`` on ``OUT/.gpipe-train.lock``, which records the holder's pid, host, start time
    and command for the run it refuses.

    The file is removed on :meth:`release` while still locked; a run that opened it just before
    sees, once it holds the lock, that the path no longer names its file, and starts over. A
    process that dies leaves the file, but the kernel drops its lock, so the next run takes it
    over. Where the file system cannot lock (``ENOLCK``, ``EOPNOTSUPP``) the run goes on and
    says so once.
    """

    NAME = ".gpipe-train.lock"

    def __init__(self, out: Path, command: str) -> None:
        import fcntl

        self.path = out / self.NAME
        self.out = out
        self._created = not out.exists()
        self._fd: int | None = None
        while self._fd is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", errors="replace")
                os.close(fd)
                raise UsageError(self._refusal(out, holder)) from None
            except OSError as e:  # a file system without locks: run, and say so
                os.close(fd)
                warning = f"cannot lock --out {out} ({e.strerror or e})"
                print(
                    f"gpipe: warning: {warning}; run one gpipe train at a time in it",
                    file=sys.stderr,
                )
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:  # released and removed by its holder while we opened it: open it again
                os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        }
        os.ftruncate(self._fd, 0)
        os.write(self._fd, (json.dumps(holder) + "\n").encode("utf-8"))

    @staticmethod
    def _refusal(out: Path, text: str) -> str:
        try:
            holder = json.loads(text)
            who = f"pid {holder['pid']} on {holder['host']}, running since {holder['since']}"
        except (ValueError, TypeError, KeyError):
            who = "a process that is starting"
        return (
            f"--out {out} is in use by another gpipe train ({who}); wait for it to finish or "
            "stop it, or pass another --out"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
            if self._created:  # a run refused at setup leaves no empty folder behind
                self.out.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def interrupted_line(out: Path, step: int | None, *, before_first_save: bool = False) -> str:
    """The one line a Ctrl-C ends ``gpipe train`` with: where it stopped (``step``, when known)
    and the checkpoint ``--resume`` continues from. ``before_first_save``: a fresh run over an
    earlier run's folder had saved nothing yet, so that run's checkpoints are still in place."""
    from gpipe.state import CheckpointError, latest, read_manifest

    at = "interrupted" if step is None else f"interrupted at step {step}"
    if before_first_save:
        return f"{at}, before its first checkpoint; the earlier run in {out} is untouched"
    last = latest(out / "checkpoints")
    if last is None:
        return f"{at}, before the first checkpoint; nothing was saved in {out}"
    try:
        saved = f" (step {read_manifest(last)[1]['step']})"
    except (CheckpointError, OSError, KeyError):
        saved = ""
    return f"{at}; last checkpoint {last}{saved}; continue with: gpipe train --out {out} --resume"


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
