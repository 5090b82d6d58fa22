"""Every ``gpipe`` subcommand x bad input: one ``gpipe: error:`` line, exit 2, no traceback.

The sweep runs :func:`gpipe.cli.main` in-process (two cases go through a real subprocess, for
the installed entry point), so it takes seconds: almost every bad value is refused before a
model is built. The data-loss tests below check that a run never destroys checkpoints it did
not replace with newer ones, and that ``gpipe export`` never writes into what it reads.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gpipe import checkpoint
from gpipe.cli import main

TINY = [
    "--model-preset", "tiny", "--seq-len", "16", "--batch-size", "4", "--chunks", "2",
    "--eval-batches", "1", "--eval-interval", "0", "--max-bytes", "20000", "--no-progress",
]  # fmt: skip
TEXT = "def f(x):\n    return x * 2  # a line of Python for a byte-level model\n" * 200
MODULE = "sweep_user_net"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files every case may name: corpora, a trained run, bad configs and traces, a module."""
    root = tmp_path_factory.mktemp("sweep")
    w: dict[str, str] = {"tmp": str(root)}

    def put(name: str, data: str | bytes) -> str:
        p = root / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        w[name.replace(".", "_").replace("-", "_")] = str(p)
        return str(p)

    put("data.txt", TEXT)
    put("empty.txt", "")
    put("small.txt", "x = 1\n")
    put("binary.bin", bytes(range(256)) * 4)
    put("afile", "not a folder\n")
    (root / "emptydir").mkdir()
    w["emptydir"] = str(root / "emptydir")
    tomls = {
        "syntax": "steps = = 3\n",
        "unknown": "stepz = 3\n",
        "steps_str": 'steps = "ten"\n',
        "steps_bool": "steps = true\n",
        "steps_float": "steps = 2.5\n",
        "lr_str": 'lr = "fast"\n',
        "lr_nan": "lr = nan\n",
        "clip_inf": "clip = inf\n",
        "schedule_int": "schedule = 3\n",
        "data_int": "data = 5\n",
        "out_int": "out = 5\n",
        "trace_str": 'trace = "yes"\n',
        "model_int": "model = 3\n",
        "model_field": "[model]\nd_modell = 64\n",
        "model_type": '[model]\nd_model = "wide"\n',
        "model_dropout": "[model]\ndropout = 2.0\n",
        "model_heads": "[model]\nn_heads = 3\n",
        "model_tie": '[model]\ntie_embeddings = "yes"\n',
        "model_preset": 'model_preset = "huge"\n',
    }
    for name, text in tomls.items():
        put(f"cfg-{name}.toml", text)
    put("cfg-latin1.toml", b'schedule = "gpipe\xe9"\n')
    put("trace-garbage.json", "this is not json {")
    put("trace-list.json", "[1, 2, 3]")
    put("trace-events.json", json.dumps({"traceEvents": [1, "x"]}))
    put(
        "trace-nots.json",
        json.dumps({"traceEvents": [{"ph": "X", "tid": 0, "args": {"stage": 0, "microbatch": 0,
                                                                     "kind": "F"}}]}),
    )  # fmt: skip
    put(
        "trace-unit.json",
        json.dumps(
            {
                "traceEvents": [
                    {"ph": "X", "tid": 0, "ts": 0, "dur": 1,
                     "args": {"stage": 0, "microbatch": 0, "kind": "F"}}
                ],
                "otherData": {"gpipe_time_unit": "fortnights"},
            }
        ),
    )  # fmt: skip
    put("trace-binary.json", b"\xff\xfe\x00garbage")
    event = {"ph": "X", "tid": 10**9, "ts": 0, "dur": 1}
    event["args"] = {"stage": 0, "microbatch": 0, "kind": "F"}
    put("trace-lanes.json", json.dumps({"traceEvents": [event]}))
    put("trace-nan.json", json.dumps({"traceEvents": [{**event, "tid": 0, "ts": math.nan}]}))
    put(
        f"{MODULE}.py",
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])\n"
        "def build_module():\n    return nn.Linear(8, 8)\n"
        "def explode():\n    raise RuntimeError('the user model failed')\n"
        "NOT_CALLABLE = 3\n",
    )
    put("sweep_broken_net.py", "def build(:\n")
    run = root / "run"
    code = main(
        ["train", *TINY, "--steps", "2", "--data", w["data_txt"], "--out", str(run), "--trace"]
    )
    assert code == 0
    w["run"] = str(run)
    w["step"] = str(checkpoint.latest(run / "checkpoints"))
    return w


def T(*extra: str, omit: str = "") -> list[str]:
    """A tiny, fast ``gpipe train`` plus ``extra`` (later flags override earlier ones), without
    the flag ``omit`` (so that a config file's value of it is the one that counts)."""
    base = [*TINY, "--steps", "1", "--data", "{data_txt}", "--out", "{tmp}/out"]
    if omit:
        i = base.index(omit)
        del base[i : i + 2]
    return ["train", *base, *extra]


# (id, argv with {placeholders} from `world`, a piece the error line must contain)
# fmt: off
CASES: list[tuple[str, list[str], str]] = [
    # ---------------------------------------------------------------- train: integer ranges
    ("steps-0", T("--steps", "0"), "steps"),
    ("steps-neg", T("--steps", "-1"), "steps"),
    ("stages-0", T("--stages", "0"), "stages"),
    ("stages-neg", T("--stages", "-2"), "stages"),
    ("stages-gt-layers", T("--stages", "5"), "4 layers"),
    ("interleaved-gt-layers", T("--stages", "3", "--schedule", "interleaved"), "layers"),
    ("chunks-0", T("--chunks", "0"), "chunks"),
    ("chunks-neg", T("--chunks", "-1"), "chunks"),
    ("chunks-not-dividing", T("--chunks", "3"), "divisible"),
    ("chunks-gt-batch", T("--chunks", "8"), "chunks"),
    ("batch-0", T("--batch-size", "0"), "batch_size"),
    ("batch-neg", T("--batch-size", "-4"), "batch_size"),
    ("seq-0", T("--seq-len", "0"), "seq_len"),
    ("seq-neg", T("--seq-len", "-1"), "seq_len"),
    ("seq-gt-max", T("--seq-len", "64"), "max_seq_len"),
    ("keep-0", T("--keep", "0"), "keep"),
    ("keep-neg", T("--keep", "-1"), "keep"),
    ("eval-batches-0", T("--eval-batches", "0"), "eval_batches"),
    ("eval-interval-neg", T("--eval-interval", "-1"), "eval_interval"),
    ("ckpt-interval-neg", T("--checkpoint-interval", "-1"), "checkpoint_interval"),
    ("warmup-neg", T("--warmup", "-1"), "warmup"),
    ("max-bytes-0", T("--max-bytes", "0"), "max_bytes"),
    ("dp-0", T("--data-parallel", "0"), "data_parallel"),
    ("dp-local", T("--data-parallel", "2"), "--runtime dist"),
    ("seed-huge", T("--seed", str(2**64)), "seed"),
    # ---------------------------------------------------------------- train: float ranges
    ("lr-0", T("--lr", "0"), "lr"),
    ("lr-neg", T("--lr", "-1"), "lr"),
    ("lr-nan", T("--lr", "nan"), "lr"),
    ("lr-inf", T("--lr", "inf"), "lr"),
    ("clip-neg", T("--clip", "-1"), "clip"),
    ("clip-nan", T("--clip", "nan"), "clip"),
    ("clip-inf", T("--clip", "inf"), "clip"),
    ("final-ratio-neg", T("--final-lr-ratio", "-0.1"), "final_lr_ratio"),
    ("final-ratio-big", T("--final-lr-ratio", "1.5"), "final_lr_ratio"),
    ("final-ratio-nan", T("--final-lr-ratio", "nan"), "final_lr_ratio"),
    ("wd-neg", T("--weight-decay", "-1"), "weight_decay"),
    ("wd-nan", T("--weight-decay", "nan"), "weight_decay"),
    ("wd-inf", T("--weight-decay", "inf"), "weight_decay"),
    ("dropout-1", T("--dropout", "1.0"), "dropout"),
    ("dropout-neg", T("--dropout", "-0.1"), "dropout"),
    ("dropout-nan", T("--dropout", "nan"), "dropout"),
    # ---------------------------------------------------------------- train: names and types
    ("schedule-unknown", T("--schedule", "pipedream"), "pipedream"),
    ("remat-unknown", T("--remat", "sometimes"), "sometimes"),
    ("precision-unknown", T("--precision", "fp8"), "fp8"),
    ("runtime-unknown", T("--runtime", "mpi"), "mpi"),
    ("preset-unknown", T("--model-preset", "huge"), "huge"),
    ("stages-not-int", T("--stages", "two"), "'two'"),
    ("steps-float", T("--steps", "1.5"), "'1.5'"),
    ("lr-not-float", T("--lr", "fast"), "'fast'"),
    ("unknown-flag", T("--bogus-flag"), "--bogus-flag"),
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["fly"], "fly"),
    # ---------------------------------------------------------------- train: data and folders
    ("data-missing", T("--data", "{tmp}/missing.txt"), "missing.txt"),
    ("data-empty-file", T("--data", "{empty_txt}"), "empty"),
    ("data-empty-dir", T("--data", "{emptydir}"), "emptydir"),
    ("data-binary", T("--data", "{binary_bin}"), "binary"),
    ("data-empty-string", T("--data", ""), "data"),
    ("data-too-small", T("--data", "{small_txt}"), "seq_len"),
    ("out-is-file", T("--out", "{afile}"), "afile"),
    ("out-under-file", T("--out", "{afile}/sub"), "afile"),
    ("resume-nothing", T("--resume", "--out", "{tmp}/never"), "nothing to resume"),
    ("resume-out-file", T("--resume", "--out", "{afile}"), "afile"),
    ("resume-other-lr", T("--resume", "--out", "{run}", "--steps", "2", "--lr", "0.5"),
     "lr (checkpoint"),
    # Refused before torchrun is launched: every rank would refuse alike.
    ("resume-dist-other-lr",
     T("--resume", "--out", "{run}", "--steps", "3", "--runtime", "dist", "--lr", "0.5"),
     "lr (checkpoint"),
    ("resume-steps-back", T("--resume", "--out", "{run}", "--steps", "1"), "--steps"),
    # ---------------------------------------------------------------- train: config files
    ("config-missing", T("--config", "{tmp}/missing.toml"), "missing.toml"),
    ("config-dir", T("--config", "{emptydir}"), "emptydir"),
    ("config-not-utf8", T("--config", "{cfg_latin1_toml}"), "cfg-latin1.toml"),
    *[
        (f"config-{name}", T("--config", f"{{cfg_{name}_toml}}", omit=omit), want)
        for name, want, omit in [
            ("syntax", "not valid TOML", ""),
            ("unknown", "stepz", ""),
            ("steps_str", "'ten'", "--steps"),
            ("steps_bool", "steps", "--steps"),
            ("steps_float", "2.5", "--steps"),
            ("lr_str", "'fast'", ""),
            ("lr_nan", "lr", ""),
            ("clip_inf", "clip", ""),
            ("schedule_int", "schedule", ""),
            ("data_int", "data", "--data"),
            ("out_int", "out", "--out"),
            ("trace_str", "trace", ""),
            ("model_int", "model", ""),
            ("model_field", "d_modell", ""),
            ("model_type", "d_model", ""),
            ("model_dropout", "dropout", ""),
            ("model_heads", "n_heads", ""),
            ("model_tie", "tie_embeddings", ""),
            ("model_preset", "huge", "--model-preset"),
        ]
    ],
    # ---------------------------------------------------------------- plan
    ("plan-stages-0", ["plan", "--stages", "0"], "stages"),
    ("plan-chunks-0", ["plan", "--chunks", "0"], "chunks"),
    ("plan-batch-neg", ["plan", "--batch-size", "-1"], "batch-size"),
    ("plan-chunks-not-dividing", ["plan", "--chunks", "3"], "divisible"),
    ("plan-seq-0", ["plan", "--seq-len", "0"], "seq-len"),
    ("plan-seq-neg", ["plan", "--seq-len", "-8"], "seq-len"),
    ("plan-seq-gt-max", ["plan", "--model-preset", "tiny", "--seq-len", "64"], "max_seq_len"),
    ("plan-stages-gt-layers", ["plan", "--model-preset", "tiny", "--stages", "5"], "layers"),
    ("plan-schedule-unknown", ["plan", "--model-preset", "tiny", "--schedule", "nope"], "nope"),
    ("plan-preset-unknown", ["plan", "--model-preset", "huge"], "huge"),
    ("plan-model-no-colon", ["plan", "--model", "nocolon"], "module:function"),
    ("plan-model-no-module", ["plan", "--model", "no_such_mod_xyz:build", "--input-shape", "8"],
     "no_such_mod_xyz"),
    ("plan-model-no-fn", ["plan", "--model", f"{MODULE}:missing", "--input-shape", "8"], "missing"),
    ("plan-model-not-callable", ["plan", "--model", f"{MODULE}:NOT_CALLABLE",
                                 "--input-shape", "8"], "NOT_CALLABLE"),
    ("plan-model-raises", ["plan", "--model", f"{MODULE}:explode", "--input-shape", "8"],
     "the user model failed"),
    ("plan-model-not-seq", ["plan", "--model", f"{MODULE}:build_module", "--input-shape", "8"],
     "nn.Sequential"),
    ("plan-model-syntax", ["plan", "--model", "sweep_broken_net:build", "--input-shape", "8"],
     "sweep_broken_net"),
    ("plan-no-input-shape", ["plan", "--model", f"{MODULE}:build"], "--input-shape"),
    ("plan-shape-letters", ["plan", "--model", f"{MODULE}:build", "--input-shape", "a,b"], "a,b"),
    ("plan-shape-empty", ["plan", "--model", f"{MODULE}:build", "--input-shape", ""],
     "--input-shape"),
    ("plan-shape-zero", ["plan", "--model", f"{MODULE}:build", "--input-shape", "0"], "0"),
    ("plan-shape-neg", ["plan", "--model", f"{MODULE}:build", "--input-shape", "-3"], "-3"),
    ("plan-shape-misfit", ["plan", "--model", f"{MODULE}:build", "--input-shape", "5"], "5"),
    ("plan-dtype", ["plan", "--model", f"{MODULE}:build", "--input-shape", "8",
                    "--input-dtype", "Size"], "Size"),
    ("plan-shape-without-model", ["plan", "--input-shape", "8"], "--model"),
    ("plan-png-missing-dir", ["plan", "--model-preset", "tiny", "--png", "{tmp}/no/dir/p.png"],
     "no/dir"),
    ("plan-png-over-text", ["plan", "--model-preset", "tiny", "--png", "{data_txt}"], "not a PNG"),
    # ---------------------------------------------------------------- generate
    ("gen-missing", ["generate", "--checkpoint", "{tmp}/nowhere"], "nowhere"),
    ("gen-file", ["generate", "--checkpoint", "{afile}"], "afile"),
    ("gen-empty-dir", ["generate", "--checkpoint", "{emptydir}"], "emptydir"),
    ("gen-tokens-neg", ["generate", "--checkpoint", "{run}", "--tokens", "-1"], "tokens"),
    ("gen-tokens-str", ["generate", "--checkpoint", "{run}", "--tokens", "many"], "'many'"),
    ("gen-temp-nan", ["generate", "--checkpoint", "{run}", "--temperature", "nan"],
     "temperature"),
    ("gen-temp-inf", ["generate", "--checkpoint", "{run}", "--temperature", "inf"],
     "temperature"),
    ("gen-temp-neg", ["generate", "--checkpoint", "{run}", "--temperature", "-1"],
     "temperature"),
    ("gen-topk-neg", ["generate", "--checkpoint", "{run}", "--top-k", "-1"], "top-k"),
    ("gen-seed-huge", ["generate", "--checkpoint", "{run}", "--seed", str(2**64)], "seed"),
    ("gen-no-checkpoint", ["generate"], "--checkpoint"),
    # ---------------------------------------------------------------- export
    ("export-missing", ["export", "{tmp}/nowhere", "{tmp}/m.safetensors"], "nowhere"),
    ("export-into-step", ["export", "{run}", "{step}/model.safetensors"], "inside"),
    ("export-into-root", ["export", "{run}/checkpoints", "{run}/checkpoints/m.safetensors"],
     "inside"),
    ("export-onto-manifest", ["export", "{step}", "{step}/manifest.json"], "inside"),
    ("export-over-metrics", ["export", "{run}", "{run}/metrics.jsonl"], "not a safetensors"),
    ("export-to-dir", ["export", "{run}", "{emptydir}"], "emptydir"),
    ("export-under-file", ["export", "{run}", "{afile}/m.safetensors"], "afile"),
    # ---------------------------------------------------------------- trace
    ("trace-missing", ["trace", "{tmp}/none.json"], "none.json"),
    ("trace-dir", ["trace", "{emptydir}"], "emptydir"),
    ("trace-garbage", ["trace", "{trace_garbage_json}"], "not JSON"),
    ("trace-list", ["trace", "{trace_list_json}"], "trace-list.json"),
    ("trace-events", ["trace", "{trace_events_json}"], "trace-events.json"),
    ("trace-no-ts", ["trace", "{trace_nots_json}"], "trace-nots.json"),
    ("trace-unit", ["trace", "{trace_unit_json}"], "fortnights"),
    ("trace-binary", ["trace", "{trace_binary_json}"], "trace-binary.json"),
    ("trace-huge-device", ["trace", "{trace_lanes_json}"], "1000000000"),
    ("trace-nan-time", ["trace", "{trace_nan_json}"], "nan"),
    ("trace-png-onto-itself", ["trace", "{run}/trace.json", "--png", "{run}/trace.json"],
     "itself"),
    ("trace-png-over-text", ["trace", "{run}/trace.json", "--png", "{run}/metrics.jsonl"],
     "not a PNG"),
    ("trace-png-missing-dir", ["trace", "{run}/trace.json", "--png", "{tmp}/no/dir/t.png"],
     "no/dir"),
]
# fmt: on


def _fill(argv: list[str], world: dict[str, str]) -> list[str]:
    return [a.format(**world) for a in argv]


@pytest.mark.parametrize(("argv", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(
    argv: list[str],
    want: str,
    world: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(world["tmp"])
    monkeypatch.chdir(world["tmp"])
    code = main(_fill(argv, world))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, f"exit {code}; stderr: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("gpipe: error: "), err
    assert want in lines[0], f"{want!r} not in {lines[0]!r}"


def test_sweep_is_large_enough() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_the_trained_run_is_untouched_by_the_sweep(world: dict[str, str]) -> None:
    """No refused case (resume with a wrong config, export into it or over its metrics, a PNG
    over them) changed the run folder."""
    step = Path(world["step"])
    rows = (Path(world["run"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if '"step"' in r][-1] == 2
    assert sorted(p.name for p in step.iterdir()) == [
        "manifest.json", "optim-00.safetensors", "optim-01.safetensors",
        "shard-00.safetensors", "shard-01.safetensors",
    ]  # fmt: skip
    assert checkpoint.load(step).step == 2


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--stages", "two"],
        ["plan", "--model", f"{MODULE}:build", "--input-shape", "5"],
    ],
    ids=["bad-int", "plan-misfit"],
)
def test_the_installed_command_prints_one_line(args: list[str], world: dict[str, str]) -> None:
    """Through the real entry point: argparse's own errors, and a user model that fails on
    fake tensors (torch logs that failure with a traceback unless it is silenced)."""
    script = Path(sys.executable).parent / "gpipe"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "gpipe.cli"]
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=120, cwd=world["tmp"]
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpipe: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_generate_with_undecodable_prompt_bytes(world: dict[str, str], capsys) -> None:
    """A prompt holding bytes that are not UTF-8 (surrogate-escaped by Python) is used as is."""
    code = main(["generate", "--checkpoint", world["run"], "--prompt", "a\udcffb", "--tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("a")


# ============================================================================ no data loss


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.list_checkpoints(folder))


@pytest.fixture
def old_run(world: dict[str, str], tmp_path: Path) -> Path:
    """A copy of the trained run: a folder holding an earlier run's checkpoint at step 2."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    return out


def _moved(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("checkpoints.old-"))


def test_fresh_run_moves_old_checkpoints_aside_after_its_first_save(
    old_run: Path, world: dict[str, str], capsys
) -> None:
    before = (old_run / "checkpoints" / "step-00000002" / "shard-00.safetensors").read_bytes()
    files = {n: (old_run / n).read_bytes() for n in ("metrics.jsonl", "config.json")}
    code = main(["train", *TINY, "--steps", "1", "--data", world["data_txt"], "--out",
                 str(old_run)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _names(old_run / "checkpoints") == ["step-00000001"]
    (aside,) = _moved(old_run)
    assert _names(aside) == ["step-00000002"]
    assert (aside / "step-00000002" / "shard-00.safetensors").read_bytes() == before
    assert checkpoint.load(aside).step == 2  # complete, verified, loadable
    assert {n: (aside / n).read_bytes() for n in files} == files  # its metrics went along
    assert json.loads((old_run / "config.json").read_text())["steps"] == 1
    lines = [line for line in out.splitlines() if str(aside) in line]
    assert len(lines) == 1 and "moved" in lines[0]


def test_two_fresh_runs_keep_both_earlier_runs(old_run: Path, world: dict[str, str]) -> None:
    args = ["train", *TINY, "--data", world["data_txt"], "--out", str(old_run)]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "1", "--seed", "1"]) == 0
    moved = _moved(old_run)
    assert len(moved) == 2
    assert sorted(checkpoint.load(p).step for p in moved) == [1, 2]


@pytest.mark.parametrize("failure", [FloatingPointError, KeyboardInterrupt])
def test_a_run_failing_at_step_1_leaves_old_checkpoints(
    old_run: Path, world: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys, failure
) -> None:
    from gpipe.train.loop import Trainer

    def fail(self: Trainer) -> dict:
        raise failure("the training loss became nan at step 0")

    monkeypatch.setattr(Trainer, "train_step", fail)
    files = {n: (old_run / n).read_bytes() for n in ("metrics.jsonl", "config.json")}
    code = main(["train", *TINY, "--steps", "3", "--data", world["data_txt"], "--out",
                 str(old_run)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == (2 if failure is FloatingPointError else 130)
    assert "Traceback" not in err
    assert _names(old_run / "checkpoints") == ["step-00000002"]
    assert checkpoint.latest(old_run / "checkpoints").name == "step-00000002"
    assert _moved(old_run) == []
    assert {n: (old_run / n).read_bytes() for n in files} == files  # put back as they were
    monkeypatch.undo()  # the earlier run still resumes, its metrics history intact
    assert main(["train", "--out", str(old_run), "--resume", "--steps", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3]


def test_a_run_refused_at_setup_leaves_old_checkpoints(
    old_run: Path, world: dict[str, str]
) -> None:
    """A mistake found only when the step runs on today's code (chunks not dividing the
    batch) is refused before anything in the run folder changes."""
    code = main(["train", *TINY, "--batch-size", "6", "--chunks", "4", "--data", world["data_txt"],
                 "--out", str(old_run)])  # fmt: skip
    assert code == 2
    assert _names(old_run / "checkpoints") == ["step-00000002"] and _moved(old_run) == []


def test_export_never_writes_into_the_checkpoint_it_reads(old_run: Path, capsys) -> None:
    step = old_run / "checkpoints" / "step-00000002"
    before = sorted(p.name for p in step.iterdir())
    for target in (step / "model.safetensors", old_run / "checkpoints" / "model.safetensors"):
        assert main(["export", str(old_run), str(target)]) == 2
        assert "inside" in capsys.readouterr().err
        assert not target.exists()
    assert sorted(p.name for p in step.iterdir()) == before
    checkpoint.load(step)  # still verifies
    metrics = (old_run / "metrics.jsonl").read_bytes()
    assert main(["export", str(old_run), str(old_run / "metrics.jsonl")]) == 2
    assert (old_run / "metrics.jsonl").read_bytes() == metrics  # not overwritten
    assert main(["export", str(old_run), str(old_run / "model.safetensors")]) == 0
    assert main(["export", str(old_run), str(old_run / "model.safetensors")]) == 0  # replaced
