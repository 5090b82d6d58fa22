"""Checkpoints: round trip, atomicity under a crash, damage detection, no unpickling, export."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpipe import state as checkpoint
from gpipe.state import CheckpointError, folder


def stage_states(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"embed.w": torch.randn(4, 3, generator=g), "block0.b": torch.randn(3, generator=g)},
        {"head.w": torch.randn(2, 3, generator=g), "head.steps": torch.tensor([7])},
    ]


def save(root: Path, step: int, **kw) -> Path:
    return checkpoint.save(root, step, stage_states(step), config={"tag": "t"}, **kw)


def test_round_trip_with_optimizer_rng_and_metadata(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    sum(p.sum() for p in params).backward()
    opt.step()
    names = ["embed.w", "block0.b"]
    tensors, meta = checkpoint.flatten_optimizer(opt.state_dict(), names)
    states = stage_states()
    rng = torch.get_rng_state()
    path = checkpoint.save(
        tmp_path,
        5,
        states,
        optimizer=tensors,
        optimizer_meta=meta,
        config={"lr": 1e-3, "betas": (0.9, 0.98)},
        balance=[2, 1],
        rng_state=rng,
        data={"step": 5},
        extra={"pipe_rng_step": 5},
    )
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "optim-00.safetensors",
        "optim-01.safetensors",
        "shard-00.safetensors",
        "shard-01.safetensors",
    ]
    ck = checkpoint.load(tmp_path)
    assert ck.step == 5 and ck.manifest["balance"] == [2, 1]
    assert ck.manifest["config"]["betas"] == (0.9, 0.98)
    for a, b in zip(ck.stages, states):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(checkpoint.decode_rng(ck.manifest["rng"]["torch_cpu"]), rng)
    restored = checkpoint.unflatten_optimizer(ck.optimizer, ck.manifest["optimizer"], names)
    opt2 = torch.optim.AdamW(
        [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, betas=(0.9, 0.98)
    )
    opt2.load_state_dict(restored)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k])


def test_latest_pointer_and_keep_last_n(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000003",
        "step-00000004",
    ]
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    assert checkpoint.load(tmp_path).step == 4
    assert checkpoint.load(tmp_path / "step-00000003").step == 3


def test_tied_tensors_in_one_shard(tmp_path: Path) -> None:
    w = torch.randn(5, 2)
    checkpoint.save(tmp_path, 0, [{"embed.w": w, "head.w": w}])
    ck = checkpoint.load(tmp_path)
    assert torch.equal(ck.stages[0]["embed.w"], w) and torch.equal(ck.stages[0]["head.w"], w)


@pytest.mark.parametrize("file", ["shard-01.safetensors", "optim-00.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(tmp_path: Path, damage: str, file: str) -> None:
    slots = {"embed.w/exp_avg": torch.ones(4, 3), "head.w/exp_avg": torch.ones(2, 3)}
    path = save(tmp_path, 1, optimizer=slots)
    shard = path / file
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
        word = "corrupted"
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        word = "truncated"
    else:
        shard.unlink()
        word = "missing"
    with pytest.raises(CheckpointError, match=word) as err:
        checkpoint.load(tmp_path)
    assert str(shard) in str(err.value)


def test_damaged_manifest_and_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path)
    path = save(tmp_path, 1)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        checkpoint.load(path)


def test_parameter_mismatch_names_first_difference(tmp_path: Path) -> None:
    save(tmp_path, 1)
    ck = checkpoint.load(tmp_path)
    good = {k: v.shape for k, v in ck.state_dict.items()}
    checkpoint.check_parameters(ck, good)
    with pytest.raises(CheckpointError, match=r"'head.w' has shape \(2, 3\) there but \(2, 4\)"):
        checkpoint.check_parameters(ck, {**good, "head.w": (2, 4)})
    with pytest.raises(CheckpointError, match="no tensor 'block1.b'"):
        checkpoint.check_parameters(ck, {**good, "block1.b": (3,)})
    del good["embed.w"]
    with pytest.raises(CheckpointError, match="it has tensor 'embed.w'"):
        checkpoint.check_parameters(ck, good)


def test_crash_between_shard_writes_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path, 1)
    real = folder.write_bytes
    calls = []

    def failing(path: Path, data: bytes) -> dict:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(folder, "write_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 2)
    monkeypatch.undo()
    ck = checkpoint.load(tmp_path)
    assert ck.step == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["step-00000001"]


CRASH_SCRIPT = """
import os, signal, sys, torch
from gpipe import state as checkpoint
from gpipe.state import folder
root = sys.argv[1]
big = [{"a.w": torch.randn(256, 256)}, {"b.w": torch.randn(256, 256)}]
checkpoint.save(root, 1, big)
real = folder.write_bytes
n = [0]
def killing(path, data):
    n[0] += 1
    if n[0] == 2:  # after the first shard of step 2 is on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
folder.write_bytes = killing
checkpoint.save(root, 2, big)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_mid_save_leaves_previous_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT), str(root)])
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left its temporary folder"
    assert checkpoint.load(root).step == 1
    assert (root / "latest").read_text().strip() == "step-00000001"
    checkpoint.save(root, 2, stage_states())  # the next save cleans the debris up
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert checkpoint.load(root).step == 2


class _Bomb:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, 1)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Bomb(str(marker)))
    for name in ("optimizer.pt", "model.pkl", "stage-00.pt", "rng.pickle"):
        (path / name).write_bytes(payload)

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    ck = checkpoint.load(tmp_path)
    assert ck.step == 1
    # A pickle in place of a shard is rejected by its hash, not executed.
    (path / "shard-00.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="shard-00.safetensors"):
        checkpoint.load(tmp_path)
    assert not marker.exists()


def test_export_writes_the_full_state_dict(tmp_path: Path) -> None:
    save(tmp_path / "ck", 3)
    out = checkpoint.export(tmp_path / "ck", tmp_path / "model.safetensors")
    merged = load_file(str(out))
    want = {k: v for s in stage_states(3) for k, v in s.items()}
    assert merged.keys() == want.keys()
    assert all(torch.equal(merged[k], want[k]) for k in want)


def test_manifest_records_hashes_and_sizes(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == os.path.getsize(path / name)
        assert len(entry["sha256"]) == 64


def test_replace_root_moves_the_old_root_aside_and_keeps_it_whole(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save(root, 7)
    new = checkpoint.staging_root(root)
    assert new.parent == tmp_path and not new.exists()
    save(new, 1)
    aside = checkpoint.replace_root(root, new)
    assert aside.name.startswith("checkpoints.old-") and not new.exists()
    assert checkpoint.load(root).step == 1
    assert checkpoint.load(aside).step == 7  # complete and verified, not deleted
    again = checkpoint.staging_root(root)
    save(again, 2)
    second = checkpoint.replace_root(root, again)  # same second: a distinct name
    assert second != aside and checkpoint.load(second).step == 1
    assert checkpoint.load(aside).step == 7 and checkpoint.load(root).step == 2


def test_export_refuses_targets_inside_the_checkpoint_or_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    step = save(root, 3)
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    for target in (step / "model.safetensors", step / "shard-00.safetensors", root / "m.st"):
        with pytest.raises(ValueError, match="inside the checkpoint folder"):
            checkpoint.export(root, target)
    with pytest.raises(ValueError, match="is a folder"):
        checkpoint.export(root, tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match="not a safetensors file; refusing to overwrite"):
        checkpoint.export(root, notes)
    assert notes.read_text() == "my notes\n"
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003"]
    assert checkpoint.export(step, tmp_path / "m.safetensors").is_file()


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["shards"][0].pop("file"),
        lambda m: m.update(shards=[3]),
        lambda m: m.update(files=None),
        lambda m: m["files"]["shard-00.safetensors"].pop("sha256"),
    ],
    ids=["no-file", "shard-not-table", "files-null", "no-hash"],
)
def test_a_manifest_of_the_wrong_shape_is_a_checkpoint_error(tmp_path: Path, damage) -> None:
    step = save(tmp_path, 1)
    mpath = step / "manifest.json"
    manifest = json.loads(mpath.read_text())
    damage(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint.load(step)
