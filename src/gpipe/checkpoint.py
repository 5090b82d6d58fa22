"""Training-state checkpoints: save, load and export, crash-safe and without pickle.

A checkpoint is one folder ``ROOT/step-XXXXXXXX`` holding

* ``stage-SS.safetensors`` — stage ``SS``'s parameters and buffers, named as in the full
  (un-pipelined) model's ``state_dict`` (``embed.tok.weight``, ``block3.ff1.bias``, ...), so
  the shards merge into that ``state_dict`` by a plain dictionary union;
* ``optim-SS.safetensors`` — the optimizer's per-parameter tensors for the same parameters,
  named ``<parameter>/<slot>`` (``block3.ff1.bias/exp_avg``);
* ``manifest.json`` — format version, step, config, balance, the optimizer's non-tensor state,
  RNG state (base64), data-sampler position, caller extras, and the size and SHA-256 of every
  other file.

``ROOT/latest`` names the newest complete checkpoint folder.

A fresh training run over a folder that already holds checkpoints saves its first checkpoint
into a staging root (:func:`staging_root`), then :func:`replace_root` moves the earlier root
aside to ``ROOT.old-<timestamp>`` and renames the staging root into its place: nothing is
deleted, and at every moment either the earlier or the new checkpoints sit at ``ROOT``.

The invariant: the checkpoint that ``latest`` names is complete and verified, whatever moment
a save is interrupted at. A save writes a hidden temporary folder, fsyncs every file and the
folder, renames it into place, then replaces ``latest`` atomically (temporary file + fsync +
``os.replace``); older folders are pruned only after that. Loading re-checks every size and
hash before a byte is interpreted, reads tensors only through safetensors and metadata only
through JSON — nothing is ever unpickled, so a planted ``.pt``/``.pkl`` file is inert.
:func:`export` never writes inside the checkpoint it reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "check_parameters",
    "clear",
    "decode_rng",
    "encode_rng",
    "export",
    "flatten_optimizer",
    "latest",
    "list_checkpoints",
    "load",
    "read_manifest",
    "replace_root",
    "save",
    "staging_root",
    "unflatten_optimizer",
]

FORMAT = "gpipe-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_SLOT_SEP = "/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or of another model or config.

    The message names the offending file (or parameter / config key) and what to do.
    """


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint.

    ``stages[s]`` is stage ``s``'s tensors by full-model name; ``optimizer`` holds the
    optimizer's tensors of all stages by ``<parameter>/<slot>`` (empty when none was saved);
    ``manifest`` is the parsed ``manifest.json``.
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
        """The full model's ``state_dict`` (every stage merged)."""
        out: dict[str, Tensor] = {}
        for shard in self.stages:
            out.update(shard)
        return out


# ----------------------------------------------------------------------------- small helpers


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it; return its size and SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _safetensors_bytes(tensors: Mapping[str, Tensor], what: str) -> bytes:
    """Serialize ``tensors`` (CPU, contiguous, storage-sharing ones cloned) with safetensors."""
    from safetensors.torch import save as st_save

    seen: set[int] = set()
    flat: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # tied weights: safetensors refuses shared storage in one file
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        flat[name] = t
    return st_save(flat)


def encode_rng(state: Tensor) -> str:
    """A torch generator state (``uint8`` tensor) as base64 text for JSON."""
    return base64.b64encode(bytes(state.to(torch.uint8).tolist())).decode("ascii")


def decode_rng(text: str) -> Tensor:
    """Inverse of :func:`encode_rng`."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _json_value(value: Any) -> Any:
    """Tuples become ``{"__tuple__": [...]}`` so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [_json_value(v) for v in value]}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        raise TypeError("a tensor cannot go into the JSON manifest; pass it as a tensor")
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------- optimizer state


def flatten_optimizer(
    state_dict: Mapping[str, Any], names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able metadata.

    ``names[i]`` is the name of the optimizer's i-th parameter (the order of its param groups'
    ``params``). Tensors come back keyed ``<name>/<slot>``; the metadata holds the param groups
    (with parameter names instead of indices) and any non-tensor per-parameter values.
    """
    groups = []
    index_to_name: dict[int, str] = {}
    for g in state_dict["param_groups"]:
        params = list(g["params"])
        for i in params:
            if not 0 <= i < len(names):
                raise ValueError(
                    f"optimizer parameter index {i} has no name; pass one name per parameter "
                    f"({len(names)} given)"
                )
            index_to_name[i] = names[i]
        groups.append(
            {**{k: _json_value(v) for k, v in g.items() if k != "params"}, "params": params}
        )
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, slots in state_dict["state"].items():
        name = index_to_name[int(i)]
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{name}{_SLOT_SEP}{slot}"] = value
            else:
                scalars.setdefault(name, {})[slot] = _json_value(value)
    meta = {
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in groups],
        "scalars": scalars,
    }
    return tensors, meta


def unflatten_optimizer(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any], names: Sequence[str]
) -> dict[str, Any]:
    """Rebuild an ``optimizer.state_dict()`` for parameters named ``names`` (in order).

    Raises :class:`CheckpointError` when the saved optimizer covers other parameters.
    """
    position = {n: i for i, n in enumerate(names)}
    groups = []
    for g in meta["param_groups"]:
        missing = [n for n in g["params"] if n not in position]
        if missing:
            raise CheckpointError(
                f"the saved optimizer state covers parameter {missing[0]!r}, which the model "
                "does not have; the checkpoint is of another model"
            )
        groups.append(
            {
                **{k: _from_json(v) for k, v in g.items() if k != "params"},
                "params": [position[n] for n in g["params"]],
            }
        )
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, slot = key.rpartition(_SLOT_SEP)
        if name not in position:
            raise CheckpointError(
                f"the saved optimizer state has {key!r} for a parameter the model does not "
                "have; the checkpoint is of another model"
            )
        state.setdefault(position[name], {})[slot] = t
    for name, slots in meta.get("scalars", {}).items():
        if name in position:
            state.setdefault(position[name], {}).update(_from_json(slots))
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint folders under ``root`` (``step-*`` with a manifest), oldest
    first by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The folder ``ROOT/latest`` names, else the highest ``step-*`` folder, else ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_RE.match(name) and (root / name / MANIFEST).is_file():
            return root / name
    found = list_checkpoints(root)
    return found[-1] if found else None


def clear(root: str | os.PathLike[str]) -> None:
    """Remove every checkpoint folder, temporary folder and the ``latest`` pointer under
    ``root`` (other files are left alone)."""
    root = Path(root)
    if not root.is_dir():
        return
    (root / LATEST).unlink(missing_ok=True)
    for p in root.iterdir():
        if p.is_dir() and (_STEP_RE.match(p.name) or p.name.startswith(_TMP_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def staging_root(root: str | os.PathLike[str]) -> Path:
    """A fresh, hidden sibling of ``root`` to save a new run's first checkpoint into."""
    root = Path(root)
    return root.with_name(f".{root.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_root(root: str | os.PathLike[str], new: str | os.PathLike[str]) -> Path:
    """Move checkpoint root ``root`` aside and rename ``new`` into its place; return where
    ``root`` went (``ROOT.old-YYYYmmdd-HHMMSS``, with ``-2``, ``-3``... if taken).

    Called only once ``new`` holds a complete checkpoint, so the earlier run's checkpoints are
    kept whole and the new run's are at ``root`` afterwards; nothing is deleted. Between the two
    renames a crash leaves both folders intact under their own names.
    """
    root, new = Path(root), Path(new)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = root.with_name(f"{root.name}.old-{stamp}")
    n = 2
    while aside.exists():
        aside = root.with_name(f"{root.name}.old-{stamp}-{n}")
        n += 1
    os.rename(root, aside)
    os.rename(new, root)
    _fsync_dir(root.parent)
    return aside


def save(
    root: str | os.PathLike[str],
    step: int,
    stages: Sequence[Mapping[str, Tensor]],
    *,
    optimizer: Mapping[str, Tensor] | None = None,
    optimizer_meta: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    balance: Sequence[int] | None = None,
    rng_state: Tensor | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of ``step`` under ``root`` atomically and return its folder.

    ``stages[s]`` maps full-model names to stage ``s``'s tensors. ``optimizer`` maps
    ``<parameter>/<slot>`` to tensors (see :func:`flatten_optimizer`); each goes to the shard
    of the stage that owns the parameter. ``optimizer_meta``, ``config``, ``data`` and
    ``extra`` must be JSON-able. ``rng_state`` is a torch generator state. The newest
    ``keep`` checkpoints are kept (``keep <= 0`` keeps all).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    owner: dict[str, int] = {}
    for s, shard in enumerate(stages):
        for name in shard:
            if name in owner:
                raise ValueError(
                    f"tensor {name!r} is in stage {owner[name]} and stage {s}; every name must "
                    "belong to exactly one stage"
                )
            owner[name] = s
    optim_shards: list[dict[str, Tensor]] = [{} for _ in stages]
    for key, t in (optimizer or {}).items():
        pname = key.rpartition(_SLOT_SEP)[0]
        if pname not in owner:
            raise ValueError(
                f"optimizer tensor {key!r} belongs to no stage's parameters; name optimizer "
                "tensors '<parameter name>/<slot>' with the stage state's names"
            )
        optim_shards[owner[pname]][key] = t

    tmp = root / f"{_TMP_PREFIX}{_step_dir_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        stage_entries = []
        for s, shard in enumerate(stages):
            name = f"stage-{s:02d}.safetensors"
            files[name] = _write_bytes(tmp / name, _safetensors_bytes(shard, name))
            entry: dict[str, Any] = {
                "file": name,
                "tensors": {
                    n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for n, t in shard.items()
                },
            }
            if optimizer is not None:
                oname = f"optim-{s:02d}.safetensors"
                files[oname] = _write_bytes(tmp / oname, _safetensors_bytes(optim_shards[s], oname))
                entry["optimizer_file"] = oname
            stage_entries.append(entry)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "config": _json_value(dict(config or {})),
            "balance": None if balance is None else [int(b) for b in balance],
            "stages": stage_entries,
            "optimizer": None if optimizer_meta is None else _json_value(dict(optimizer_meta)),
            "rng": None if rng_state is None else {"torch_cpu": encode_rng(rng_state)},
            "data": _json_value(dict(data or {})),
            "extra": _json_value(dict(extra or {})),
            "files": files,
        }
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
        _write_bytes(tmp / MANIFEST, text.encode("utf-8"))
        _fsync_dir(tmp)

        final = root / _step_dir_name(step)
        old = None
        if final.exists():  # re-saving a step: move the old one aside, then drop it
            old = root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, final.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep, final)
    return final


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _write_bytes(tmp, (name + "\n").encode("utf-8"))
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep: int, current: Path) -> None:
    for p in root.iterdir():  # leftovers of crashed saves (never the one just written)
        if p.name.startswith(_TMP_PREFIX) or p.name.startswith(f"{LATEST}.{_TMP_PREFIX}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if keep <= 0:
        return
    found = [p for p in list_checkpoints(root) if p != current]
    found.append(current)
    found.sort(key=lambda p: int(_STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]
    for p in found[:-keep]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from either a run's checkpoint root or a ``step-*`` folder."""
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
    folder = _resolve(path)
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
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} has format version {version!r}; this gpipe reads version "
            f"{FORMAT_VERSION} — use the gpipe version that wrote it"
        )
    for key in ("step", "stages", "files"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint manifest {mpath} lacks the {key!r} entry")
    return folder, _from_json(manifest)


def load(path: str | os.PathLike[str], *, optimizer: bool = True) -> Checkpoint:
    """Load and verify the checkpoint at ``path`` (a ``step-*`` folder, a checkpoint root —
    its ``latest`` — or a run folder holding ``checkpoints/``).

    Every file's size and SHA-256 are checked against the manifest before it is parsed.
    Raises :class:`CheckpointError` naming the file for a missing, truncated or corrupted one.
    """
    folder, manifest = read_manifest(path)
    try:
        return _load_files(folder, manifest, optimizer)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest of the wrong shape
        raise CheckpointError(
            f"checkpoint manifest {folder / MANIFEST} is malformed ({type(e).__name__}: {e}); "
            "the checkpoint is damaged — load an earlier one"
        ) from e


def _load_files(folder: Path, manifest: dict[str, Any], optimizer: bool) -> Checkpoint:
    files = manifest["files"]
    stages: list[dict[str, Tensor]] = []
    optim: dict[str, Tensor] = {}
    for entry in manifest["stages"]:
        name = entry["file"]
        if name not in files:
            raise CheckpointError(f"{folder / MANIFEST} lists {name} without its hash")
        tensors = _load_tensors(_read_verified(folder, name, files[name]), folder / name)
        expected = set(entry.get("tensors", tensors))
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
    ckpt: Checkpoint | Mapping[str, Tensor],
    expected: Mapping[str, Tensor | Sequence[int] | torch.Size],
    *,
    where: str = "the checkpoint",
) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's tensors have exactly the names
    and shapes of ``expected`` (a ``state_dict``, or names → shapes); names the first mismatch.
    """
    have = ckpt.state_dict if isinstance(ckpt, Checkpoint) else dict(ckpt)
    if isinstance(ckpt, Checkpoint):
        where = str(ckpt.path)
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
        got = tuple(have[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{where} is of another model: {name!r} has shape {got} there but {shape} in "
                "the model (check --model-preset and the model config)"
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
    if _STEP_RE.match(folder.name):
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
    """Write the un-pipelined model's ``state_dict`` from checkpoint ``path`` as one
    safetensors file at ``out_path`` (atomically); return ``out_path``.

    The file's metadata carries the model config as JSON under ``"gpipe_config"``. Raises
    ``ValueError`` for a target that is a folder or lies inside the checkpoint being read.
    """
    from safetensors.torch import save as st_save

    folder = _resolve(path)
    out = Path(out_path)
    _check_export_target(folder, out)
    ckpt = load(folder, optimizer=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "gpipe_step": str(ckpt.step)}
    model_cfg = ckpt.manifest.get("config", {}).get("model")
    if model_cfg is not None:
        meta["gpipe_config"] = json.dumps(model_cfg, sort_keys=True)
    data = st_save({n: t.contiguous() for n, t in ckpt.state_dict.items()}, metadata=meta)
    tmp = out.with_name(f"{out.name}.{_TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
