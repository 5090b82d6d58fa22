"""Running ``gpipe train --runtime dist``: the torchrun relaunch and the ranks' error lines.

:func:`launch_dist` re-runs the command under torchrun with one process per stage and replica;
each process calls :func:`init_dist` (gloo on CPU, NCCL on GPUs, every collective bounded by
:data:`DIST_TIMEOUT`) and runs the same trainer.

The invariant: a user error is one ``gpipe: error:`` line and exit code 2 here too. A launched
rank does not print its error: :func:`report_error` writes it to a file in the folder the
launcher gave it (``GPIPE_ERROR_DIR``); the launcher stops relaying the ranks' stderr once one
is there (so torchrun's own failure report is not shown), prints the most specific line — a
rank's own error before another rank's ``rank R failed: ...`` echo of it — and returns 2.
A Ctrl-C is one line too: torchrun runs in its own session, so only the launcher gets the
terminal's SIGINT; it stops relaying, hands torchrun one SIGINT (torchrun passes it to each
rank once), and prints the main rank's line (:func:`report_interrupted`: the step and the last
checkpoint) or, if no rank got that far, the last checkpoint on disk, and returns 130.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from gpipe.cli.base import EXIT_USAGE, fail, one_line
from gpipe.cli.run import LOCKED_ENV, interrupted_line

__all__ = [
    "DIST_TIMEOUT",
    "ERROR_DIR_ENV",
    "EXIT_INTERRUPTED",
    "init_dist",
    "launch_dist",
    "report_error",
    "report_interrupted",
]


def launch_dist(config: Any, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with stages × data-parallel processes; a user error
    in any of them comes back as one line and exit code 2, a Ctrl-C as one line naming the
    last checkpoint and exit code 130 (see the module docstring)."""
    n = config.stages * config.data_parallel
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "-m",
        "gpipe.cli",
        *argv,
    ]
    print(f"gpipe: launching {n} processes: {' '.join(cmd)}", file=sys.stderr)
    errors = Path(tempfile.mkdtemp(prefix="gpipe-errors-"))
    interrupted = threading.Event()
    try:
        env = {**os.environ, ERROR_DIR_ENV: str(errors), LOCKED_ENV: "1"}
        # torchrun in its own session: a Ctrl-C reaches this process only, which hands torchrun
        # one SIGINT (torchrun passes it on to each rank once)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
        relay = threading.Thread(target=_relay, args=(proc, errors, interrupted), daemon=True)
        relay.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            interrupted.set()
            _interrupt(proc)
            code = EXIT_INTERRUPTED
        relay.join(10)
        message = _launched_error(errors)
        stopped = _read(errors / INTERRUPTED_FILE)
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    if stopped is not None or interrupted.is_set():
        line = stopped or interrupted_line(Path(config.out), None)
        print(f"gpipe: {line}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if message is not None:
        print(f"gpipe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return code


EXIT_INTERRUPTED = 130
"""The exit code of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)."""

INTERRUPTED_FILE = "interrupted.txt"
"""Where the main rank of a launched run leaves its line when a Ctrl-C stopped it."""

STOP_TIMEOUT = 90.0
"""Seconds torchrun has to stop its ranks after a Ctrl-C (it gives them 30, then kills them)."""


def _interrupt(proc: subprocess.Popen) -> None:
    """Hand torchrun one SIGINT and wait for it to stop its ranks; kill it after
    :data:`STOP_TIMEOUT` seconds or a second Ctrl-C."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


ERROR_DIR_ENV = "GPIPE_ERROR_DIR"
_DERIVED = re.compile(r"^rank \d+ failed: ")


def _relay(proc: subprocess.Popen, errors: Path, interrupted: threading.Event) -> None:
    """Pass the ranks' stderr (progress bar included) through as it comes, until a rank has
    reported a user error or a Ctrl-C came: torchrun's failure or shutdown report that follows
    is not the user's business."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while chunk := os.read(fd, 65536):
        if interrupted.is_set() or any(errors.iterdir()):
            continue
        if out is not None:
            out.write(chunk)
            out.flush()
        else:  # a captured stderr (tests): text only
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))


def _read(path: Path) -> str | None:
    """The text of ``path`` stripped, or ``None`` when it does not exist or is empty."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


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
    where = _launcher_folder()
    if where is None:
        return fail(message)
    _hand_over(where / f"rank-{int(os.environ.get('RANK', '0'))}.txt", one_line(message))
    return EXIT_USAGE


def report_interrupted(line: str) -> int:
    """Print ``line`` (where a Ctrl-C stopped the run) as ``gpipe: ...`` — or, in a rank
    launched by :func:`launch_dist`, hand it to the launcher — and return 130."""
    where = _launcher_folder()
    if where is None:
        print(f"gpipe: {one_line(line)}", file=sys.stderr)
    else:
        _hand_over(where / INTERRUPTED_FILE, one_line(line))
    return EXIT_INTERRUPTED


def _launcher_folder() -> Path | None:
    """The folder the launcher reads this rank's lines from, when launched by it."""
    where = os.environ.get(ERROR_DIR_ENV)
    return Path(where) if where and "LOCAL_RANK" in os.environ else None


def _hand_over(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (a temporary file renamed), for the launcher."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
