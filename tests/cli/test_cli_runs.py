"""``gpipe train`` as a run in a folder: one run per ``--out``, Ctrl-C, a full disk, and the
option combinations ``--auto`` refuses — each ends in one line, never a traceback.

Runs that must be interrupted or overlapped are real subprocesses (a Ctrl-C is a SIGINT to the
command's process group, as a terminal sends it), bounded by timeouts; the rest call
:func:`gpipe.cli.main` in this process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import TINY, gpipe_cmd

from gpipe import state
from gpipe.cli import main
from gpipe.cli.run import RunLock

QUICK = [*TINY, "--eval-interval", "0", "--no-progress"]
LOCK = RunLock.NAME


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpipe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def start(out: Path, *extra: str) -> subprocess.Popen:
    """A long ``gpipe train`` into ``out`` (a checkpoint every step), in its own process group,
    as a terminal would run it."""
    cmd = [*gpipe_cmd(), "train", *QUICK, "--steps", "100000", "--checkpoint-interval", "1"]
    return subprocess.Popen(
        [*cmd, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while state.latest(out / "checkpoints") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint in {out}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def ctrl_c(proc: subprocess.Popen) -> str:
    """SIGINT to the run's process group; its stderr once it stopped (exit code checked)."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    return err


def assert_names_the_last_checkpoint(err: str, out: Path) -> None:
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gpipe: interrupted")]
    last = state.latest(out / "checkpoints")
    assert last is not None and f"last checkpoint {last} (step " in line
    assert f"gpipe train --out {out} --resume" in line
    state.load(last)  # complete and verified


# ============================================================================ one run per --out


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_and_ctrl_c_names_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    first = start(out)
    try:
        wait_for_checkpoint(first, out)
        second = subprocess.run(
            [*gpipe_cmd(), "train", *QUICK, "--steps", "2", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"--out {out} is in use by another gpipe train (pid {first.pid} " in line
        assert "running since" in line
        assert not [p for p in out.iterdir() if p.name.startswith("checkpoints.old-")]
    finally:
        err = ctrl_c(first)
    assert_names_the_last_checkpoint(err, out)
    assert not (out / LOCK).exists()  # released


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_under_the_dist_runtime_is_one_line_and_exit_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = start(out, "--runtime", "dist", "--stages", "2")
    try:
        wait_for_checkpoint(launcher, out, timeout=240)
    finally:
        err = ctrl_c(launcher)
    assert_names_the_last_checkpoint(err, out)
    assert not (out / LOCK).exists()


def test_a_run_holding_the_folder_is_named_and_nothing_is_touched(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    with RunLock(out, "gpipe train (the other run)"):
        code = main(["train", *QUICK, "--steps", "1", "--out", str(out)])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2
        assert f"(pid {os.getpid()} on " in line and "pass another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # no checkpoint, no metrics
    assert not out.exists()  # the folder the refused run would have created is not left behind


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path: Path, capsys) -> None:
    """What a killed run leaves: the lock file naming it, but no lock (the kernel dropped it)."""
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 2**22 + 1, "host": "gone", "since": "2000-01-01 00:00:00", "command": "x"}
    (out / LOCK).write_text(json.dumps(dead) + "\n")
    assert main(["train", *QUICK, "--steps", "1", "--out", str(out)]) == 0, capsys.readouterr()
    assert state.latest(out / "checkpoints").name == "step-00000001"
    assert not (out / LOCK).exists()


# ============================================================================ a full disk


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from gpipe.state import folder

    real = folder.write_bytes

    def full_at_step_2(path: Path, data: bytes) -> dict:
        if ".tmp-step-00000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(folder, "write_bytes", full_at_step_2)
    out = tmp_path / "run"
    code = main(["train", *QUICK, "--steps", "3", "--checkpoint-interval", "1", "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    root = out / "checkpoints"
    good = root / "step-00000001"
    assert f"no space left on the device of {root} to save step 2" in line
    assert f"the last complete checkpoint {good} is intact" in line
    assert f"gpipe train --out {out} --resume" in line
    # the bytes needed: the state being written, i.e. about the size of step 1's tensor files
    need = int(re.search(r"needs about ([\d,]+) bytes", line).group(1).replace(",", ""))
    written = sum(f["bytes"] for f in state.read_manifest(good)[1]["files"].values())
    assert 0.9 * written < need <= written
    assert state.latest(root) == good and state.load(good).step == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no debris


# ============================================================================ option combinations


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--memory-limit", "8GiB"],
            "--memory-limit 8GiB is the limit the planner plans under: add --auto",
        ),
        (
            ["--auto", "--schedule", "1f1b"],
            "so --schedule cannot be given with it; drop --schedule",
        ),
        (["--auto", "--chunks", "4", "--remat", "never"], "so --chunks and --remat cannot be"),
        (["--auto", "--model", "m:f"], "--auto plans the preset TransformerLM, not --model m:f"),
    ],
)
def test_options_that_would_be_ignored_or_overridden_are_refused(
    argv: list[str], message: str, tmp_path: Path, capsys
) -> None:
    base = ["--seq-len", "32", "--batch-size", "8", "--max-bytes", "100000"]
    code = main(["train", *base, *argv, "--steps", "1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
