"""The ``gpipe`` command, run for real: train, plan, generate, export, trace, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gpipe.cli import main
from gpipe.models import TransformerConfig, TransformerLM
from runs import TINY, gpipe_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*gpipe_cmd(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run(
        "train", *TINY, "--steps", "4", "--eval-interval", "2", "--out", str(out), "--trace",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_trace_leaves_trace_timeline_metrics_and_checkpoint(trained) -> None:
    out, proc = trained
    assert (out / "timeline.png").read_bytes()[:8] == PNG_MAGIC
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 4]
    step = next(r for r in rows if r["kind"] == "step")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "bubble"} <= step.keys()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    config = json.loads((out / "config.json").read_text())
    assert config["model_preset"] == "tiny" and config["steps"] == 4
    assert "unigram byte entropy" in proc.stdout and "final validation loss" in proc.stdout


def test_generate_export_and_trace_from_the_run(trained, tmp_path: Path, capsys) -> None:
    out, _ = trained
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.encode()) >= 12

    model_file = tmp_path / "model.safetensors"
    assert main(["export", str(out / "checkpoints"), str(model_file)]) == 0
    model = TransformerLM(TransformerConfig.preset("tiny"))
    model.load_state_dict(load_file(str(model_file)))  # strict: every name matches

    png = tmp_path / "again.png"
    assert main(["trace", str(out / "trace.json"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_resume_continues_and_refuses_a_different_config(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert "resumed from" in capsys.readouterr().out

    code = main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gpipe: error: ") and "lr (checkpoint 0.003, now 0.5)" in err
    assert err.count("\n") == 1


def test_bad_input_is_one_line_exit_2_without_traceback(tmp_path: Path) -> None:
    proc = run("train", *TINY, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "missing.txt" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_corrupted_checkpoint_is_named(trained, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    shard = out / "checkpoints" / "step-00000004" / "shard-01.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["generate", "--checkpoint", str(out), "--tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "truncated" in err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "m.safetensors")]) == 2


def test_toml_config_with_flags_overriding(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'model-preset = "tiny"\nseq_len = 16\nbatch-size = 4\nchunks = 2\nsteps = 5\n'
        "eval-interval = 0\neval-batches = 1\nmax-bytes = 50000\n"
        "[model]\ndropout = 0.0\nd_ff = 48\n"
    )
    out = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--steps", "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 1 and saved["seq_len"] == 16
    assert saved["model_resolved"]["d_ff"] == 48 and saved["model_resolved"]["dropout"] == 0.0
    cfg.write_text("stepz = 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'stepz'" in capsys.readouterr().err


def test_plan_1b_words_runs_without_allocating(tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    proc = run(
        "plan", "--model-preset", "1b-words", "--stages", "4", "--chunks", "32",
        "--batch-size", "32", "--png", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for word in ("block31", "imbalance", "gpipe", "1f1b", "interleaved", "zb-h1", "GiB"):
        assert word in proc.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plan_of_a_user_model(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["plan", "--model", "mynet:build", "--input-shape", "64", "--stages", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "balance [2, 2, 2]" in out and "imbalance max/mean 1.000" in out
    assert main(["plan", "--model", "mynet:nothing", "--input-shape", "64"]) == 2


def test_help_and_usage_errors(capsys) -> None:
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--stages", "two"]) == 2
    assert main(["train", "--precision", "fp8"]) == 2
    assert "precision must be one of" in capsys.readouterr().err
    assert main(["train", "--schedule", "1f1b", "--virtual-stages", "2"]) == 2
    assert "--virtual-stages" in capsys.readouterr().err
