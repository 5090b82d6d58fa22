"""The prepared GPU check must not rot: CI runs ``benchmarks/gpu.sh`` in its CPU dry mode.

The same script runs on a lent GPU (``bash benchmarks/gpu.sh``); here ``DEVICE=cpu QUICK=1``
runs every step of it on the CPU with the source tree on ``PYTHONPATH`` and no pip, as on a
bare offline machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "QUICK": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
    }
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check = (tmp_path / "gpu_check.md").read_text()
    assert "| NO |" not in check and "HANG" not in check
    assert "passed, 0 failed" in check and "gpu_check exit status: 0" in check
    assert "passed" in (tmp_path / "tests.txt").read_text()
    assert "gpu_bench exit status: 0" in (tmp_path / "gpu_bench.md").read_text()


@pytest.mark.slow
def test_stream_host_cost_benchmark_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_streams_host.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("| gpipe |") == 2 and "one send + receive" in res.stdout
