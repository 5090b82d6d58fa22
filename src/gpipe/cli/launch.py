"""Running ``gpipe train --runtime dist``: the torchrun relaunch and the ranks' error lines.

:func:`launch_dist` re-runs the command under torchrun with one process per stage and replica;
each process calls :func:`init_dist` (gloo on CPU, NCCL on GPUs, every collective bounded by
:data:`DIST_TIMEOUT`) and runs the same trainer.

The invariant: a user error is one ``gpipe: error:`` line and exit code 2 here too. A launched
rank does not print its error: :func:`report_error` writes it to a file in the folder the
launcher gave it (``GPIPE_ERROR_DIR``); the launcher stops relaying the ranks' stderr once one
is there (so torchrun's own failure report is not shown), prints the most specific line — a
rank's own error before another rank's ``rank R failed: ...`` echo of it — and returns 2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from gpipe.cli.base import EXIT_USAGE, fail, one_line

__all__ = ["DIST_TIMEOUT", "ERROR_DIR_ENV", "init_dist", "launch_dist", "report_error"]


def launch_dist(config: Any, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with stages × data-parallel processes; a user error
    in any of them comes back as one line and exit code 2 (see the module docstring)."""
    n = config.stages * config.data_parallel
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
        "-m", "gpipe.cli", *argv,
    ]  # fmt: skip
    print(f"gpipe: launching {n} processes: {' '.join(cmd)}", file=sys.stderr)
    errors = Path(tempfile.mkdtemp(prefix="gpipe-errors-"))
    try:
        env = {**os.environ, ERROR_DIR_ENV: str(errors)}
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        relay = threading.Thread(target=_relay, args=(proc, errors), daemon=True)
        relay.start()
        code = proc.wait()
        relay.join(10)
        message = _launched_error(errors)
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    if message is not None:
        print(f"gpipe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return code


ERROR_DIR_ENV = "GPIPE_ERROR_DIR"
_DERIVED = re.compile(r"^rank \d+ failed: ")


def _relay(proc: subprocess.Popen, errors: Path) -> None:
    """Pass the ranks' stderr (progress bar included) through as it comes, until a rank has
    reported a user error: torchrun's failure report that follows is not the user's business."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while chunk := os.read(fd, 65536):
        if any(errors.iterdir()):
            continue
        if out is not None:
            out.write(chunk)
            out.flush()
        else:  # a captured stderr (tests): text only
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))


def _launched_error(errors: Path) -> str | None:
    """The most specific error line the ranks wrote (a rank's own error before another rank's
    "rank R failed: ..." echo of it), or ``None``."""
    found = sorted(errors.glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    lines = [p.read_text(encoding="utf-8").strip() for p in found]
    lines = [line for line in lines if line]
    own = [line for line in lines if not _DERIVED.match(line)]
    return (own or lines or [None])[0]


def report_error(message: str) -> int:
    """Print ``message`` as the one error line — or, in a rank launched by
    :func:`launch_dist`, hand it to the launcher — and return the usage exit code."""
    where = os.environ.get(ERROR_DIR_ENV)
    if where and "LOCAL_RANK" in os.environ:
        rank = int(os.environ.get("RANK", "0"))
        tmp = Path(where) / f".rank-{rank}.tmp"
        tmp.write_text(one_line(message) + "\n", encoding="utf-8")
        os.replace(tmp, Path(where) / f"rank-{rank}.txt")
        return EXIT_USAGE
    return fail(message)


DIST_TIMEOUT = 300.0
"""Seconds any wait of a distributed run may last (messages, collectives, checkpoint saves)."""


def init_dist() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = timedelta(seconds=DIST_TIMEOUT)  # every collective's wait is bounded
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
