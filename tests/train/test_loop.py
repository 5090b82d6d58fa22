"""The training loop: learning-rate schedule, bitwise resume, export equivalence, refusals."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpipe import state
from gpipe import state as checkpoint
from gpipe.models import TransformerConfig, TransformerLM
from gpipe.state import CheckpointError
from gpipe.train.data import load_corpus
from gpipe.train.loop import ConfigMismatch, TrainConfig, Trainer, learning_rate
from runs import tiny


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=60_000)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_learning_rate_warms_up_then_decays() -> None:
    kw = dict(lr=1.0, warmup=10, steps=110, final_ratio=0.1)
    lrs = [learning_rate(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert learning_rate(110, **kw) == pytest.approx(0.1)
    assert learning_rate(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_resume_is_bitwise_identical(tmp_path: Path, corpus) -> None:
    full = Trainer(tiny(tmp_path / "full"), corpus=corpus)
    full_losses = [r["loss"] for r in full.run() if r["kind"] == "step"]
    full_params = params(full.model)
    full_rng_step = full.pipe.rng_step
    full.close()

    # The "crashed" run: same config, stopped right after the checkpoint at step 3.
    cut = Trainer(tiny(tmp_path / "cut"), corpus=corpus)
    first = []
    for rec in cut.run():
        if rec["kind"] == "step":
            first.append(rec["loss"])
        if rec["kind"] == "checkpoint":
            break
    cut.close()
    assert len(first) == 3

    resumed = Trainer(tiny(tmp_path / "cut"), resume=True, corpus=corpus)
    assert resumed.step == 3 and resumed.pipe.rng_step == 3
    rest = [r["loss"] for r in resumed.run() if r["kind"] == "step"]
    assert first + rest == full_losses  # exact float equality
    assert resumed.pipe.rng_step == full_rng_step
    got = params(resumed.model)
    assert all(torch.equal(got[n], full_params[n]) for n in full_params)
    resumed.close()


def test_export_gives_a_plain_model_with_the_pipes_logits(tmp_path: Path, corpus) -> None:
    t = Trainer(tiny(tmp_path, steps=2, eval_interval=0), corpus=corpus)
    records = list(t.run())
    assert records[-1]["kind"] == "checkpoint"
    out = checkpoint.export(tmp_path / "checkpoints", tmp_path / "model.safetensors")
    plain = TransformerLM(TransformerConfig.preset("tiny", dropout=0.1))
    plain.load_state_dict(load_file(str(out)))
    plain.eval()
    t.pipe.eval()
    x = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        assert torch.allclose(plain(x), t.pipe.pipe(x), atol=1e-6, rtol=0)
    t.close()


def test_resume_refuses_another_config_or_model(tmp_path: Path, corpus) -> None:
    t = Trainer(tiny(tmp_path, steps=1, eval_interval=0), corpus=corpus)
    list(t.run())
    t.close()
    with pytest.raises(ConfigMismatch, match=r"lr \(checkpoint 0.003, now 0.01\)"):
        Trainer(tiny(tmp_path, lr=0.01), resume=True, corpus=corpus)
    with pytest.raises(ConfigMismatch, match="d_model"):
        Trainer(tiny(tmp_path, model={"dropout": 0.1, "d_model": 64}), resume=True, corpus=corpus)
    # Changing the pipeline layout is allowed: parameters load by name.
    Trainer(tiny(tmp_path, stages=1, chunks=2), resume=True, corpus=corpus).close()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(tiny(tmp_path / "empty"), resume=True, corpus=corpus)


def test_fresh_run_keeps_old_checkpoints_until_its_first_save(tmp_path: Path, corpus) -> None:
    t = Trainer(tiny(tmp_path, steps=2, eval_interval=0, checkpoint_interval=1), corpus=corpus)
    list(t.run())
    t.close()
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == [
        "step-00000001",
        "step-00000002",
    ]
    fresh = Trainer(tiny(tmp_path, steps=1, eval_interval=0), corpus=corpus)
    assert len(checkpoint.list_checkpoints(root)) == 2  # building a run touches nothing
    records = [r for r in fresh.run() if r["kind"] == "checkpoint"]
    fresh.close()
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000001"]
    aside = Path(records[0]["moved_aside"])
    assert aside == fresh.moved_aside and aside.parent == tmp_path
    assert aside.name.startswith("checkpoints.old-")
    assert [p.name for p in checkpoint.list_checkpoints(aside)] == [
        "step-00000001",
        "step-00000002",
    ]
    assert checkpoint.load(aside).step == 2  # the earlier run's latest, complete
    assert not [p for p in tmp_path.iterdir() if ".new-" in p.name]  # no staging left


@pytest.mark.parametrize(
    "schedule", ["1f1b", "interleaved", "interleaved-zb", "zb-h1", "zb-v", "dualpipe-v"]
)
def test_every_schedule_trains_and_checkpoints(tmp_path: Path, corpus, schedule: str) -> None:
    t = Trainer(tiny(tmp_path, steps=2, eval_interval=0, schedule=schedule), corpus=corpus)
    recs = list(t.run())
    t.close()
    assert [r["kind"] for r in recs] == ["step", "step", "eval", "checkpoint"]
    ck = checkpoint.load(tmp_path / "checkpoints")
    assert len(ck.stages) == 2  # one shard per pipeline device, virtual stages included
    assert ck.topology["schedule"] == schedule and ck.topology["runtime"] == "local"
    two_per_device = schedule in ("interleaved", "interleaved-zb", "zb-v", "dualpipe-v")
    assert len(ck.topology["balance"]) == (4 if two_per_device else 2)
    checkpoint.check_parameters(ck, TransformerLM(TransformerConfig.preset("tiny")).state_dict())


def test_interleaving_at_any_v_trains_as_the_default_cut_does(tmp_path: Path, corpus) -> None:
    """``virtual_stages`` (``--virtual-stages``) cuts the model into K·V stages, V per device;
    the checkpoint records it, and two steps end at the parameters the same run reaches at
    V = 2 and under 1F1B (the keyed streams make dropout independent of the cut)."""
    deep = {"dropout": 0.1, "n_layers": 4}  # embedding, 4 blocks, head: 6 layers
    runs = {}
    for name, kw in {
        "v3": dict(schedule="interleaved", virtual_stages=3),
        "v2": dict(schedule="interleaved"),
        "1f1b": dict(schedule="1f1b"),
        "izb3": dict(schedule="interleaved-zb", virtual_stages=3),
    }.items():
        out = tmp_path / name
        t = Trainer(tiny(out, steps=2, eval_interval=0, model=deep, **kw), corpus=corpus)
        list(t.run())
        runs[name] = params(t.model)
        t.close()
        ck = checkpoint.load(out / "checkpoints")
        v = kw.get("virtual_stages", 2 if name == "v2" else 1)
        assert ck.topology["virtual_stages"] == v and len(ck.topology["balance"]) == 2 * v
    for name in ("v2", "1f1b", "izb3"):
        for n, p in runs["v3"].items():
            assert torch.allclose(p, runs[name][n], atol=1e-5), (name, n)


def test_metrics_records(tmp_path: Path, corpus) -> None:
    t = Trainer(tiny(tmp_path, steps=3, trace=True, precision="bf16"), corpus=corpus)
    recs = list(t.run())
    t.close()
    kinds = [r["kind"] for r in recs]
    assert kinds == ["eval", "step", "step", "step", "trace", "eval", "checkpoint"]
    step = recs[1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "bubble"):
        assert math.isfinite(step[key]), key
    assert 0 <= step["bubble"] < 1
    assert recs[4]["events"] and recs[4]["num_devices"] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(chunks=8, batch_size=4), "batch_size=4 is not divisible by chunks=8"),
        (dict(chunks=3, batch_size=4), "batch_size=4 is not divisible by chunks=3"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(seq_len=64), "exceeds the model's max_seq_len=32"),
        (dict(model_preset="huge"), "model_preset must be one of"),
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(clip=math.nan), "clip must be a finite number >= 0, got nan"),
        (dict(weight_decay=math.inf), "weight_decay must be a finite"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(keep=0), "keep must be an integer >= 1"),
        (dict(stages=5), "exceeds the model's 4 layers"),
        (dict(schedule=3), "schedule must be one of"),
        (dict(model={"tie_embeddings": "yes"}), "model.tie_embeddings must be true or false"),
        (dict(model={"d_model": 32.0}), "model.d_model must be an integer"),
        (dict(data=""), "data must be the path"),
        (dict(trace="no"), "trace must be true or false"),
        (dict(virtual_stages=2), "virtual_stages=2 needs .*--virtual-stages"),
        (dict(schedule="interleaved", virtual_stages=0), "virtual_stages must be an integer"),
        (dict(schedule="interleaved", virtual_stages=3), "2 stages x 3 virtual stages = 6"),
        (dict(schedule="zb-v", virtual_stages=3), "--virtual-stages"),
    ],
)
def test_config_is_validated(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **change)


def test_config_round_trips_through_a_dict(tmp_path: Path) -> None:
    c = tiny(tmp_path)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({**c.to_dict(), "lrr": 1})
    assert dataclasses.replace(c, steps=9).steps == 9


def test_an_empty_data_path_is_refused_not_read_as_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here.txt").write_text("text in the current folder\n" * 100)
    monkeypatch.chdir(tmp_path)
    for path in ("", " "):
        with pytest.raises(ValueError, match="corpus path is empty"):
            load_corpus(path)
    with pytest.raises(ValueError, match="data must be the path"):
        tiny(tmp_path, data="")


def test_a_failed_first_save_leaves_the_earlier_checkpoints(
    tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = Trainer(tiny(tmp_path, steps=1, eval_interval=0), corpus=corpus)
    list(t.run())
    t.close()
    root = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in (root / "step-00000001").iterdir()}
    real_commit = state.commit

    def full_disk(where, *args, **kwargs):
        real_commit(where, *args, **kwargs)  # written, then the disk "fills" before it is kept
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "commit", full_disk)
    fresh = Trainer(tiny(tmp_path, steps=2, eval_interval=0, seed=1), corpus=corpus)
    with pytest.raises(OSError, match="No space left"):
        list(fresh.run())
    fresh.close()
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000001"]
    assert {p.name: p.read_bytes() for p in (root / "step-00000001").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no staging left


def as_format_1(step_dir: Path) -> None:
    """Rewrite a (non-interleaved, local) checkpoint the way gpipe wrote them before format 2:
    ``stage-SS``/``optim-SS`` files listed under ``stages``, no topology."""
    import hashlib
    import json

    mpath = step_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    renames = {}
    for entry in m["shards"]:
        for key in ("file", "optimizer_file"):
            new = entry[key].replace("shard-", "stage-")
            (step_dir / entry[key]).rename(step_dir / new)
            renames[entry[key]] = new
            entry[key] = new
    m["stages"] = m.pop("shards")
    m.pop("topology")
    m["format_version"] = 1
    m["files"] = {renames.get(k, k): v for k, v in m["files"].items()}
    for name, entry in m["files"].items():
        assert entry["sha256"] == hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    mpath.write_text(json.dumps(m))


def test_a_format_1_checkpoint_still_resumes_bit_for_bit(tmp_path: Path, corpus) -> None:
    full = Trainer(tiny(tmp_path / "full"), corpus=corpus)
    full_losses = [r["loss"] for r in full.run() if r["kind"] == "step"]
    full.close()
    cut = Trainer(tiny(tmp_path / "cut"), corpus=corpus)
    first = []
    for rec in cut.run():
        first += [rec["loss"]] if rec["kind"] == "step" else []
        if rec["kind"] == "checkpoint":
            break
    cut.close()
    as_format_1(tmp_path / "cut" / "checkpoints" / "step-00000003")
    ck = checkpoint.load(tmp_path / "cut")
    assert ck.manifest["format_version"] == 1 and ck.topology["runtime"] == "local"
    resumed = Trainer(tiny(tmp_path / "cut"), resume=True, corpus=corpus)  # the same cut
    rest = [r["loss"] for r in resumed.run() if r["kind"] == "step"]
    resumed.close()
    assert first + rest == full_losses


def test_resume_keeps_the_micro_batches_per_step_not_the_chunks(tmp_path: Path) -> None:
    """Micro-batch i of a step draws dropout stream i, so local chunks=4 continues as
    2 replicas x 2 chunks, and 2 chunks do not continue as 2 x 2."""
    from gpipe.train.config import resume_differences

    saved = tiny(tmp_path, chunks=4).to_dict()
    dp2 = tiny(tmp_path, chunks=2, runtime="dist", data_parallel=2, stages=3)
    assert resume_differences(saved, dp2) == []
    saved = tiny(tmp_path, chunks=2).to_dict()
    assert resume_differences(saved, dp2) == [
        "chunks x data_parallel, the micro-batches per step (checkpoint 2 x 1 = 2, now 2 x 2 = 4)"
    ]
    assert resume_differences(saved, tiny(tmp_path, chunks=1)) == ["chunks (checkpoint 2, now 1)"]
