"""Reading a saved training state: verify, load by parameter name, export.

Both formats load: version 2 (``shard-DD`` files, one per pipeline device, with the topology in
the manifest) and version 1 (``stage-SS`` files, one per stage, written before topology-free
resume existed). Either way the shards hold tensors by full-model name, so :class:`Checkpoint`
merges them into one ``state_dict`` and whatever topology reads it takes the names it needs.

The invariant: nothing is interpreted before it is verified. Every file's size and SHA-256 are
checked against the manifest before it is parsed; tensors are read only through safetensors and
metadata only through JSON — nothing is ever unpickled, so a planted ``.pt``/``.pkl`` file is
inert. :func:`export` never writes inside the checkpoint it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpipe.state.codec import from_json
from gpipe.state.folder import (
    FORMAT,
    MANIFEST,
    READABLE_VERSIONS,
    STEP_RE,
    TMP_PREFIX,
    CheckpointError,
    latest,
    write_bytes,
)


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint.

    ``stages[i]`` is shard ``i``'s tensors by full-model name (one per pipeline device in
    format 2, per stage in format 1; shards a filtered :func:`load` skipped are empty);
    ``optimizer`` holds the optimizer's tensors by ``<parameter>/<slot>``; ``manifest`` is the
    parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]
    stages: list[dict[str, Tensor]]
    optimizer: dict[str, Tensor] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """Completed optimizer steps when the checkpoint was taken."""
        return int(self.manifest["step"])

    @property
    def state_dict(self) -> dict[str, Tensor]:
        """The full model's ``state_dict`` (every shard merged)."""
        out: dict[str, Tensor] = {}
        for shard in self.stages:
            out.update(shard)
        return out

    @property
    def topology(self) -> dict[str, Any]:
        """How the state was written: runtime, stages, balance, data_parallel, schedule (format
        1 recorded only the balance; it was always the local runtime)."""
        return topology_of(self.manifest)


def topology_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The topology a manifest records (format 1: derived from its config and balance)."""
    topo = manifest.get("topology")
    if isinstance(topo, dict):
        return dict(topo)
    config = manifest.get("config") or {}
    return {
        "runtime": "local",
        "stages": config.get("stages"),
        "balance": manifest.get("balance"),
        "data_parallel": 1,
        "schedule": config.get("schedule"),
    }


def shard_entries(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shard entries (``shards`` in format 2, ``stages`` in format 1)."""
    key = "shards" if "shards" in manifest else "stages"
    return list(manifest[key])


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a run folder, a checkpoint root or a ``step-*`` folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {str(p)!r} does not exist; pass a checkpoint folder "
            "(e.g. runs/lm/checkpoints) written by gpipe train"
        )
    if (p / MANIFEST).is_file():
        return p
    if (p / "checkpoints").is_dir():  # a run folder (gpipe train --out DIR)
        p = p / "checkpoints"
    found = latest(p)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(p)!r}: no {MANIFEST} and no step-* folder with one; "
            "pass the folder gpipe train wrote (DIR/checkpoints or one of its step-* folders)"
        )
    return found


def _read_verified(folder: Path, name: str, entry: Mapping[str, Any]) -> bytes:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} is missing; the checkpoint is incomplete — load an "
            "earlier one or re-create it"
        )
    data = path.read_bytes()
    want = int(entry["bytes"])
    if len(data) != want:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or padded: {len(data):,} bytes, the manifest "
            f"says {want:,}; the file is damaged — load an earlier checkpoint"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint file {path} is corrupted: its SHA-256 does not match the manifest; "
            "load an earlier checkpoint"
        )
    return data


def _load_tensors(data: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as e:  # a file whose hash matched but is not safetensors
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {e}") from e


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder ``path`` resolves to and its parsed, format-checked manifest."""
    folder = resolve(path)
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint manifest {mpath} is unreadable ({e}); the checkpoint is damaged — "
            "load an earlier one"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a gpipe checkpoint manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{mpath} has format version {version!r}; this gpipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} — use the gpipe version that wrote it"
        )
    shards = "shards" if version >= 2 else "stages"
    for key in ("step", shards, "files"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint manifest {mpath} lacks the {key!r} entry")
    return folder, from_json(manifest)


def load(
    path: str | os.PathLike[str],
    *,
    optimizer: bool = True,
    want: Callable[[str], bool] | None = None,
) -> Checkpoint:
    """Load and verify the checkpoint at ``path`` (a ``step-*`` folder, a checkpoint root —
    its ``latest`` — or a run folder holding ``checkpoints/``).

    ``want(name)`` (default: every name) selects the tensors a caller needs: a shard none of
    whose tensors it wants is not read at all (a rank of a distributed run reads only the
    shards that hold its own layers). Every file read is checked against the manifest's size
    and SHA-256 first. Raises :class:`CheckpointError` naming the file for a missing,
    truncated or corrupted one.
    """
    folder, manifest = read_manifest(path)
    try:
        return _load_files(folder, manifest, optimizer, want)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a manifest of wrong shape
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint manifest {folder / MANIFEST} is malformed ({type(e).__name__}: {e}); "
            "the checkpoint is damaged — load an earlier one"
        ) from e


def _load_files(
    folder: Path,
    manifest: dict[str, Any],
    optimizer: bool,
    want: Callable[[str], bool] | None,
) -> Checkpoint:
    files = manifest["files"]
    stages: list[dict[str, Tensor]] = []
    optim: dict[str, Tensor] = {}
    for entry in shard_entries(manifest):
        name = entry["file"]
        if name not in files:
            raise CheckpointError(f"{folder / MANIFEST} lists {name} without its hash")
        listed = entry.get("tensors")
        if want is not None and listed is not None and not any(want(n) for n in listed):
            stages.append({})
            continue
        tensors = _load_tensors(_read_verified(folder, name, files[name]), folder / name)
        expected = set(listed if listed is not None else tensors)
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[0]
            raise CheckpointError(
                f"checkpoint file {folder / name} does not hold the tensors its manifest lists "
                f"(first difference: {odd!r})"
            )
        stages.append(tensors)
        oname = entry.get("optimizer_file")
        if optimizer and oname:
            if oname not in files:
                raise CheckpointError(f"{folder / MANIFEST} lists {oname} without its hash")
            optim.update(_load_tensors(_read_verified(folder, oname, files[oname]), folder / oname))
    return Checkpoint(path=folder, manifest=manifest, stages=stages, optimizer=optim)


def check_parameters(
    ckpt: Checkpoint | Mapping[str, Tensor] | Mapping[str, Sequence[int]],
    expected: Mapping[str, Tensor | Sequence[int] | torch.Size],
    *,
    where: str = "the checkpoint",
) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's tensors have exactly the names
    and shapes of ``expected`` (a ``state_dict``, or names → shapes); names the first mismatch.

    A :class:`Checkpoint` is checked against its manifest's tensor list, so a filtered load
    (which read only some shards) is checked whole.
    """
    if isinstance(ckpt, Checkpoint):
        where = str(ckpt.path)
        have = {
            n: tuple(meta["shape"])
            for entry in shard_entries(ckpt.manifest)
            for n, meta in (entry.get("tensors") or {}).items()
        } or {n: tuple(t.shape) for n, t in ckpt.state_dict.items()}
    else:
        have = {
            n: tuple(v.shape) if isinstance(v, Tensor) else tuple(int(s) for s in v)
            for n, v in ckpt.items()
        }
    want = {
        n: tuple(v.shape) if isinstance(v, Tensor) else tuple(int(s) for s in v)
        for n, v in expected.items()
    }
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(
                f"{where} is of another model: it has no tensor {name!r}, which the model has "
                "(check --model-preset and the model config)"
            )
        if have[name] != shape:
            raise CheckpointError(
                f"{where} is of another model: {name!r} has shape {have[name]} there but "
                f"{shape} in the model (check --model-preset and the model config)"
            )
    extra = [n for n in have if n not in want]
    if extra:
        raise CheckpointError(
            f"{where} is of another model: it has tensor {extra[0]!r}, which the model lacks "
            "(check --model-preset and the model config)"
        )


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header length, JSON header)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(path.stat().st_size - 8, 100 * 2**20):
                return False
            return isinstance(json.loads(f.read(n)), dict)
    except (OSError, ValueError):
        return False


def _check_export_target(folder: Path, out: Path) -> None:
    """Refuse an export target that is a folder, an existing file that is not safetensors
    (a run's ``metrics.jsonl``, say), or lies inside the checkpoint being read (its
    ``step-*`` folder, or the checkpoint root that holds it and ``latest``)."""
    if out.is_dir():
        raise ValueError(
            f"export target {str(out)!r} is a folder; give a file name, e.g. "
            f"{str(out / 'model.safetensors')!r}"
        )
    protected = [folder]
    if STEP_RE.match(folder.name):
        protected.append(folder.parent)
    target = out.resolve()
    for p in protected:
        p = p.resolve()
        if target == p or p in target.parents:
            raise ValueError(
                f"refusing to export to {str(out)!r}: it is inside the checkpoint folder "
                f"{str(p)!r} that export reads; write the file elsewhere, e.g. "
                f"{str(p.parent / 'model.safetensors')!r}"
            )
    if out.is_file() and not _is_safetensors(out):
        raise ValueError(
            f"export target {str(out)!r} exists and is not a safetensors file; refusing to "
            "overwrite it — pass a new file name (or delete that file first)"
        )


def export(path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the un-pipelined model's ``state_dict`` from checkpoint ``path`` (of any topology
    or format version) as one safetensors file at ``out_path`` (atomically); return it.

    The file's metadata carries the model config as JSON under ``"gpipe_config"``. Raises
    ``ValueError`` for a target that is a folder or lies inside the checkpoint being read.
    """
    from safetensors.torch import save as st_save

    folder = resolve(path)
    out = Path(out_path)
    _check_export_target(folder, out)
    ckpt = load(folder, optimizer=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "gpipe_step": str(ckpt.step)}
    model_cfg = ckpt.manifest.get("config", {}).get("model")
    if model_cfg is not None:
        meta["gpipe_config"] = json.dumps(model_cfg, sort_keys=True)
    data = st_save({n: t.contiguous() for n, t in ckpt.state_dict.items()}, metadata=meta)
    tmp = out.with_name(f"{out.name}.{TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
