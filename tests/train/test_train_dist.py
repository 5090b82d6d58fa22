"""``gpipe train --runtime dist`` end to end: checkpoints, bitwise resume, resume across runtimes
and stage counts, one trace of every rank, the same optimizer groups as the local runtime.

Four real distributed runs (the CLI relaunching itself under torchrun, gloo on loopback) and a
few local ones in this process share one module fixture; every launch is bounded by a timeout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents import agents, run_all
from gpipe import state
from gpipe.cli import main
from gpipe.models import TransformerConfig, TransformerLM
from gpipe.train.loop import decays

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = 3  # the cut; runs go to 2N steps
ARGS = [
    "--model-preset", "tiny", "--dropout", "0.1", "--seq-len", "16", "--batch-size", "4",
    "--chunks", "2", "--eval-batches", "1", "--max-bytes", "60000", "--warmup", str(N),
    "--eval-interval", "0", "--checkpoint-interval", str(N), "--keep", "3", "--no-progress",
]  # fmt: skip
"""Warm-up covers the first N steps, so a run of N steps and one of 2N take the same N first
steps (the cosine tail depends on --steps)."""


def dist(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpipe.cli", "train", *ARGS, "--runtime", "dist", *args],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_agents(*args: str) -> None:
    """``gpipe train --runtime dist`` across two torchrun agents (``--nnodes 2``), as on two
    machines."""
    cmd = ["-m", "gpipe.cli", "train", *ARGS, "--runtime", "dist", *args]
    run_all(agents(2, "gpipe-train-agents", *cmd), timeout=150)


def local(*args: str) -> None:
    assert main(["train", *ARGS, "--runtime", "local", *args]) == 0


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as if it had stopped right after its checkpoint at ``step``."""
    shutil.copytree(src, dst)
    root = dst / "checkpoints"
    for p in state.list_checkpoints(root):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (root / "latest").write_text(f"step-{step:08d}\n")
    return dst


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


def final(out: Path) -> state.Checkpoint:
    return state.load(out / "checkpoints")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    r = {k: tmp / k for k in ("dist", "local", "cut", "to_dist", "to_local", "agents")}
    dist("--stages", "2", "--steps", str(2 * N), "--trace", "--out", str(r["dist"]))
    local("--stages", "2", "--steps", str(2 * N), "--out", str(r["local"]))
    # Stopped at N, then resumed to 2N: the same runtime and cut.
    dist("--stages", "2", "--steps", str(N), "--out", str(r["cut"]))
    dist("--resume", "--steps", str(2 * N), "--out", str(r["cut"]))
    # A local 2-stage checkpoint resumed by 3 processes, and a dist one resumed locally.
    rewind(r["local"], r["to_dist"], N)
    dist("--resume", "--stages", "3", "--out", str(r["to_dist"]))
    rewind(r["dist"], r["to_local"], N)
    local("--resume", "--stages", "3", "--out", str(r["to_local"]))
    two_agents("--stages", "2", "--steps", str(2 * N), "--out", str(r["agents"]))
    return r


def test_two_torchrun_agents_train_like_one(runs: dict[str, Path]) -> None:
    # the trainer across two agents (machines) follows the one-agent run bit for bit
    assert losses(runs["agents"]) == losses(runs["dist"])
    got, want = final(runs["agents"]).state_dict, final(runs["dist"]).state_dict
    assert got.keys() == want.keys()
    diff = {
        n: float((got[n] - t).abs().max()) for n, t in want.items() if not torch.equal(got[n], t)
    }
    assert not diff, diff


def test_dist_resume_is_bitwise_identical(runs: dict[str, Path]) -> None:
    assert losses(runs["cut"]) == losses(runs["dist"])  # exact float equality, 2N steps
    got, want = final(runs["cut"]), final(runs["dist"])
    assert got.step == want.step == 2 * N
    assert got.state_dict.keys() == want.state_dict.keys()
    assert all(torch.equal(got.state_dict[n], t) for n, t in want.state_dict.items())
    assert got.optimizer.keys() == want.optimizer.keys()
    assert all(torch.equal(got.optimizer[n], t) for n, t in want.optimizer.items())
    assert got.topology == {
        "runtime": "dist",
        "stages": 2,
        "balance": [2, 2],
        "data_parallel": 1,
        "schedule": "gpipe",
        "virtual_stages": 1,
    }


@pytest.mark.parametrize(
    ("run", "runtime", "stages"), [("to_dist", "dist", 3), ("to_local", "local", 3)]
)
def test_resume_under_the_other_runtime_and_stage_count(
    runs: dict[str, Path], run: str, runtime: str, stages: int
) -> None:
    ref, got = losses(runs["local"]), losses(runs[run])
    assert sorted(got) == list(range(1, 2 * N + 1))
    assert max(abs(got[s] - ref[s]) for s in got) < 1e-5
    topo = final(runs[run]).topology
    assert (topo["runtime"], topo["stages"], len(topo["balance"])) == (runtime, stages, stages)
    want = final(runs["local"]).state_dict
    have = final(runs[run]).state_dict
    assert max(float((have[n] - t).abs().max()) for n, t in want.items()) < 1e-4


def test_dist_follows_the_local_run(runs: dict[str, Path]) -> None:
    ref, got = losses(runs["local"]), losses(runs["dist"])
    assert max(abs(got[s] - ref[s]) for s in ref) < 1e-5


def test_dist_optimizer_groups_are_the_local_ones(runs: dict[str, Path]) -> None:
    """Weight decay on matrices only, under both runtimes (dist used to decay everything)."""
    model = TransformerLM(TransformerConfig.preset("tiny"))
    matrices = decays(model)
    assert "embed.tok.weight" not in matrices and "block0.qkv.weight" in matrices
    for run in ("dist", "local"):
        groups = final(runs[run]).manifest["optimizer"]["param_groups"]
        by_decay = {g["weight_decay"]: set(g["params"]) for g in groups}
        assert by_decay == {
            0.01: matrices,
            0.0: {n for n, _ in model.named_parameters()} - matrices,
        }


def test_dist_trace_is_one_timeline_of_every_rank(runs: dict[str, Path]) -> None:
    out = runs["dist"]
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    names = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    assert names == {0: "rank 0 (replica 0, device 0)", 1: "rank 1 (replica 0, device 1)"}
    at = {(e["tid"], e["name"]): (e["ts"], e["ts"] + e["dur"]) for e in spans}
    assert len(at) == 8  # F and B of 2 micro-batches on each of 2 ranks
    slack = 25_000.0  # µs: the clocks are aligned to well within this (a loaded machine
    # records a sender's end after its receiver started; seconds apart would mean unaligned)
    for m in range(2):  # on one clock, a stage starts only after its neighbour handed over
        assert at[(1, f"F{m}")][0] >= at[(0, f"F{m}")][1] - slack
        assert at[(0, f"B{m}")][0] >= at[(1, f"B{m}")][1] - slack
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bubbles = [r["bubble"] for r in rows if r["kind"] == "step"]
    assert len(bubbles) == 2 * N and all(0 < b < 1 for b in bubbles)


def test_export_works_on_any_topology(runs: dict[str, Path], tmp_path: Path) -> None:
    for run in ("dist", "to_dist"):
        target = tmp_path / f"{run}.safetensors"
        assert main(["export", str(runs[run]), str(target)]) == 0
        from safetensors.torch import load_file

        model = TransformerLM(TransformerConfig.preset("tiny"))
        model.load_state_dict(load_file(str(target)))  # strict: every name is there


def test_an_error_on_one_rank_is_one_line_and_exit_2(runs: dict[str, Path], tmp_path: Path) -> None:
    """A shard only rank 1 reads is corrupted (same size, so only its hash tells): the ranks'
    errors come back through the launcher as one line, without torchrun's report."""
    out = tmp_path / "run"
    shutil.copytree(runs["dist"], out)
    shard = out / "checkpoints" / f"step-{2 * N:08d}" / "shard-01.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "gpipe.cli", "train", "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "shard-01.safetensors is corrupted" in errors[0]
