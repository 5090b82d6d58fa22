"""``gpipe train --model module:function``: a captured Hugging Face causal LM trained by the
trainer equals the un-pipelined model stepped by hand, resumes bit for bit, and every misuse
is one ``gpipe: error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpipe.cli.main import main
from gpipe.models import lm_loss
from gpipe.train.data import get_batch, load_corpus
from gpipe.train.loop import TrainConfig, Trainer, decays, learning_rate
from gpipe.train.pipe import clip_global_norm_

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
FN = "examples.hf_causal_lm:tiny_llama"
SMALL = ["--batch-size", "4", "--chunks", "2", "--seq-len", "32", "--max-bytes", "100000"]
SMALL += ["--eval-batches", "1", "--eval-interval", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # examples.hf_causal_lm imports from the project's root


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=100_000)


def steps(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps of the CLI, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--model", FN, "--steps", "6", "--lr", "1e-2", "--warmup", "1"]
    argv += ["--checkpoint-interval", "3", "--out", str(out), *SMALL]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert main(argv) == 0
    return out


def test_the_cli_trains_a_captured_model_and_its_loss_falls(run: Path) -> None:
    losses = steps(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.2, losses
    saved = json.loads((run / "checkpoints" / "step-00000006" / "manifest.json").read_text())
    assert saved["config"]["model_fn"] == FN
    from examples.hf_causal_lm import tiny_llama

    # the model's own keys (no layer names), so either runtime and any K can resume it
    names = {n for shard in saved["shards"] for n in shard["tensors"]}
    assert names == set(tiny_llama(seq_len=32).state_dict())


def test_resume_continues_bit_for_bit(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert steps(out) == steps(run)  # exactly: same cut, same runtime


@pytest.mark.slow
def test_dist_runtime_trains_alike_and_resumes_locally(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    argv = ["train", "--model", FN, "--steps", "6", "--lr", "1e-2", "--warmup", "1"]
    argv += ["--checkpoint-interval", "3", "--out", str(out), *SMALL, "--runtime", "dist"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gpipe.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = steps(run)
    assert steps(out) == pytest.approx(want, rel=1e-6)
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # resume the dist run in one process
    assert main(["train", "--out", str(out), "--resume", "--runtime", "local"]) == 0
    assert steps(out) == pytest.approx(want, rel=1e-6)


def test_losses_equal_the_unpipelined_model_stepped_by_hand(corpus, tmp_path: Path) -> None:
    from examples.hf_causal_lm import tiny_llama

    config = TrainConfig(
        model_fn=FN, stages=2, chunks=2, batch_size=4, seq_len=32, steps=4, lr=1e-2,
        warmup=1, clip=0.5, out=str(tmp_path), max_bytes=100_000,
    )  # fmt: skip
    trainer = Trainer(config, corpus=corpus)
    try:
        got = [trainer.train_step()["loss"] for _ in range(config.steps)]
    finally:
        trainer.close()
    torch.manual_seed(config.seed)
    model = tiny_llama(seq_len=config.seq_len)
    named = list(model.named_parameters())
    decay = decays(model)
    assert decay and "model.embed_tokens.weight" not in decay  # embeddings are not decayed
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, betas=(config.beta1, config.beta2), eps=config.eps)
    want = []
    for s in range(config.steps):
        x, y = get_batch(corpus.train, config.batch_size, config.seq_len, seed=0, step=s)
        loss = lm_loss(model(x).logits, y)
        loss.backward()
        want.append(loss.item())
        clip_global_norm_([p for _, p in named], config.clip)
        for g in opt.param_groups:
            g["lr"] = learning_rate(s, lr=config.lr, warmup=1, steps=4, final_ratio=0.1)
        opt.step()
        opt.zero_grad()
    assert want[-1] < want[0]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


BAD_MODELS = """
import torch
from torch import nn


class Bytes(nn.Module):
    def __init__(self, vocab=256, wrap=None):
        super().__init__()
        self.emb = nn.Embedding(256, 8)
        self.head = nn.Linear(8, vocab)
        self.wrap = wrap

    def forward(self, x):
        out = self.head(self.emb(x))
        return {self.wrap: out} if self.wrap else out


def small_vocab():
    return Bytes(vocab=100)


def no_logits():
    return Bytes(wrap="scores")


def not_a_module():
    return 3


class Branchy(Bytes):
    def forward(self, x):
        out = super().forward(x)
        return out if out.sum() > 0 else -out  # a branch on a value: no graph


def branchy():
    return Branchy()


def with_sample(seq_len):
    torch.manual_seed(1)
    return Bytes(), torch.randint(0, 256, (2, seq_len))


def other_length(seq_len):
    return Bytes(), torch.randint(0, 256, (2, seq_len // 2))


def dict_sample(seq_len):
    return Bytes(), {"x": torch.randint(0, 256, (2, seq_len))}
"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "examples.hf_causal_lm"], "module:function"),
        (["--model", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "examples.hf_causal_lm:nope"], "has no function 'nope'"),
        (["--model", "bad_lm_models:small_vocab"], "vocab >= 256"),
        (["--model", "bad_lm_models:no_logits"], "no logits"),
        (["--model", "bad_lm_models:not_a_module"], "must return an nn.Module"),
        (["--model", "bad_lm_models:branchy"], "cannot capture --model bad_lm_models:branchy"),
        (["--model", "bad_lm_models:other_length"], "sample of shape (2, 16) and dtype int64"),
        (["--model", "bad_lm_models:dict_sample"], "returned keyword inputs ['x'] as its sample"),
        (["--model", FN, "--model-preset", "tiny"], "--model-preset"),
        (["--model", FN, "--dropout", "0.1"], "--dropout"),
        (["--model", FN, "--config", "{toml}"], "[model] overrides"),
    ],
)
def test_misuse_is_one_error_line(
    argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "bad_lm_models.py").write_text(textwrap.dedent(BAD_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nd_model = 64\n")
    argv = [a.replace("{toml}", str(toml)) for a in argv]
    code = main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "o"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gpipe: error:"), err
    assert message in err[0]


def test_resume_with_another_model_fn_is_refused_naming_both(run: Path, capsys) -> None:
    other = "examples.hf_causal_lm:build"
    code = main(["train", "--out", str(run), "--resume", "--model", other, "--steps", "7"])
    err = capsys.readouterr().err
    assert code == 2
    assert FN in err and other in err and "model_fn" in err


def test_generate_needs_a_preset_model(run: Path, capsys) -> None:
    ckpt = run / "checkpoints" / "step-00000006"
    code = main(["generate", "--checkpoint", str(ckpt), "--tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs a preset model" in err and FN in err


def test_model_fn_is_checked_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="module:function"):
        TrainConfig(model_fn="nocolon", out=str(tmp_path))
    with pytest.raises(ValueError, match=r"\[model\] overrides"):
        TrainConfig(model_fn=FN, model={"d_model": 64}, out=str(tmp_path))
    config = TrainConfig(model_fn=FN, stages=64, out=str(tmp_path))  # layers known at capture
    assert TrainConfig.from_dict(config.to_dict()).model_fn == FN


def test_the_readme_command_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith(f"gpipe train --model {FN}")]
    argv = line.split()[1:]
    assert argv[argv.index("--model") + 1] == FN
    out = tmp_path / "r"  # the README's options, then a shorter run
    assert main([*argv, "--steps", "2", "--out", str(out), *SMALL]) == 0
    assert sorted(steps(out)) == [1, 2]


def test_a_function_may_give_its_own_sample(corpus, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bad_lm_models.py").write_text(textwrap.dedent(BAD_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = TrainConfig(
        model_fn="bad_lm_models:with_sample", chunks=2, batch_size=4, seq_len=32, steps=5,
        lr=0.05, warmup=1, out=str(tmp_path / "o"), max_bytes=100_000,
    )  # fmt: skip
    trainer = Trainer(config, corpus=corpus)
    try:
        assert [p.layers for p in trainer.pipe.pipe.partitions] == [("emb",), ("head",)]
        losses = [trainer.train_step()["loss"] for _ in range(config.steps)]
    finally:
        trainer.close()
    assert losses[-1] < losses[0] - 0.5, losses
