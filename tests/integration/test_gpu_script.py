"""The prepared GPU check must not rot: CI runs ``benchmarks/gpu.sh`` in its CPU dry mode.

The same script runs on a lent GPU (``bash benchmarks/gpu.sh``); here its dry mode
(``GPU_DRY=1``, also ``make gpu-dry``) runs its steps on the CPU with the source tree on
``PYTHONPATH`` and no pip, as on a bare offline machine.
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
    env = {**os.environ, "GPU_DRY": "1", "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = (tmp_path / "gpu_steps.md").read_text()
    # every section ran: the schedules, the host pipes both ways, the two gloo ranks
    assert "| schedules | gpipe |" in steps and "| schedules | 1f1b |" in steps
    assert steps.count("| host | 1f1b |") == 2 and "(2 gloo ranks)" in steps
    assert "| NO |" not in steps and "5 passed, 0 failed" in steps
    assert "gpu_steps exit status: 0" in steps and "sanitizer: skipped" in steps
    check = (tmp_path / "gpu_check.md").read_text()
    assert "| NO |" not in check and "HANG" not in check
    assert "passed, 0 failed" in check and "gpu_check exit status: 0" in check
    assert "passed" in (tmp_path / "tests.txt").read_text()


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
