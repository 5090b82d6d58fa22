"""Writing a saved training state: shards, the manifest, and the crash-safe commit.

A saved state is one folder ``ROOT/step-XXXXXXXX`` holding

* ``shard-DD.safetensors`` — the parameters and buffers pipeline device ``DD`` held, named as
  in the full (un-pipelined) model's ``state_dict`` (``embed.tok.weight``, ...), so the shards
  merge into that ``state_dict`` by a plain dictionary union, whatever topology reads them;
* ``optim-DD.safetensors`` — the optimizer's per-parameter tensors of the same parameters,
  named ``<parameter>/<slot>`` (``block3.ff1.bias/exp_avg``);
* ``manifest.json`` — format version, step, config, the topology it was written with, the
  optimizer's non-tensor state by parameter name, RNG state (base64), data position, caller
  extras, and the size and SHA-256 of every other file.

``ROOT/latest`` names the newest complete folder. The write is split so that several processes
can take part: :func:`begin` makes the hidden temporary folder (one process), every writer
calls :func:`write_shard` for its own shards, and one process calls :func:`commit` with all
the shards' records once every writer has finished (:func:`save` does all three in one
process).

The invariant: the folder ``latest`` names is complete and verified, whatever moment a save is
interrupted at. Shards go into the temporary folder and are fsynced; :func:`commit` writes the
manifest last, fsyncs, renames the folder into place, then replaces ``latest`` atomically
(temporary file + fsync + ``os.replace``); older folders are pruned only after that.
"""

from __future__ import annotations

import errno
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

from torch import Tensor

from gpipe.state.codec import encode_rng, json_value

FORMAT = "gpipe-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
SLOT_SEP = "/"


class CheckpointError(ValueError):
    """A saved state that cannot be used: missing, damaged, or of another model or config.

    The message names the offending file (or parameter / config key) and what to do.
    """


class NoSpaceError(OSError):
    """A save the disk (or the user's quota) had no room for: its temporary files are removed,
    and the last complete checkpoint under the root is intact. The message names the folder,
    the bytes the save needs and that checkpoint."""


def raise_if_full(error: OSError, root: str | os.PathLike[str], step: int, need: int) -> None:
    """Raise :class:`NoSpaceError` (from ``error``) when ``error`` is a full disk or quota
    while saving step ``step`` under ``root``, a save of about ``need`` bytes; else return."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    last = latest(root)
    kept = f"the last complete checkpoint {last} is intact" if last else "nothing was saved yet"
    raise NoSpaceError(
        error.errno,
        f"no space left on the device of {root} to save step {step} ({error.strerror}): the "
        f"save needs about {need:,} bytes there; {kept}",
    ) from error


@dataclass
class ShardRecord:
    """What one :func:`write_shard` wrote: its manifest entry and its files' sizes and hashes
    (plain data, so it can travel between processes)."""

    index: int
    entry: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- small helpers


def step_dir_name(step: int) -> str:
    """``step-XXXXXXXX``: the folder name of step ``step``."""
    return f"step-{step:08d}"


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename inside it is on disk (no-op where unsupported)."""
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


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it; return its size and SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def safetensors_bytes(tensors: Mapping[str, Tensor], what: str) -> bytes:
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


# ----------------------------------------------------------------------------- the folder


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint folders under ``root`` (``step-*`` with a manifest), oldest
    first by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The folder ``ROOT/latest`` names, else the highest ``step-*`` folder, else ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_RE.match(name) and (root / name / MANIFEST).is_file():
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
        if p.is_dir() and (STEP_RE.match(p.name) or p.name.startswith(TMP_PREFIX)):
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
    fsync_dir(root.parent)
    return aside


# ----------------------------------------------------------------------------- writing


def begin(root: str | os.PathLike[str], step: int) -> Path:
    """Create (under ``root``) and return the hidden temporary folder of step ``step``'s save."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_shard(
    tmp: Path,
    index: int,
    tensors: Mapping[str, Tensor],
    optimizer: Mapping[str, Tensor] | None = None,
) -> ShardRecord:
    """Write shard ``index`` (model tensors by full-model name, and optionally the optimizer's
    ``<parameter>/<slot>`` tensors of the same parameters) into ``tmp``, fsynced."""
    name = f"shard-{index:02d}.safetensors"
    files = {name: write_bytes(tmp / name, safetensors_bytes(tensors, name))}
    entry: dict[str, Any] = {
        "file": name,
        "tensors": {
            n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in tensors.items()
        },
    }
    if optimizer is not None:
        for key in optimizer:
            if key.rpartition(SLOT_SEP)[0] not in tensors:
                raise ValueError(
                    f"optimizer tensor {key!r} belongs to no parameter of shard {index}; name "
                    "optimizer tensors '<parameter name>/<slot>' with the shard's names"
                )
        oname = f"optim-{index:02d}.safetensors"
        files[oname] = write_bytes(tmp / oname, safetensors_bytes(optimizer, oname))
        entry["optimizer_file"] = oname
    return ShardRecord(index, entry, files)


def abort(tmp: Path) -> None:
    """Remove a temporary folder whose save failed (nothing else is touched)."""
    shutil.rmtree(tmp, ignore_errors=True)


def commit(
    root: str | os.PathLike[str],
    tmp: Path,
    step: int,
    shards: Sequence[ShardRecord],
    *,
    config: Mapping[str, Any] | None = None,
    topology: Mapping[str, Any] | None = None,
    optimizer_meta: Mapping[str, Any] | None = None,
    rng_state: Tensor | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the manifest of ``shards`` (every writer's records) into ``tmp``, rename it to
    ``ROOT/step-XXXXXXXX``, point ``latest`` at it and prune to the newest ``keep``
    (``keep <= 0`` keeps all); return the folder. On failure ``tmp`` is removed."""
    root = Path(root)
    try:
        shards = sorted(shards, key=lambda r: r.index)
        owner: dict[str, int] = {}
        files: dict[str, dict[str, Any]] = {}
        for rec in shards:
            for name in rec.entry["tensors"]:
                if name in owner:
                    raise ValueError(
                        f"tensor {name!r} is in shard {owner[name]} and shard {rec.index}; "
                        "every name must belong to exactly one shard"
                    )
                owner[name] = rec.index
            files.update(rec.files)
        topo = dict(topology or {})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "config": json_value(dict(config or {})),
            "topology": json_value(topo),
            "balance": topo.get("balance"),
            "shards": [rec.entry for rec in shards],
            "optimizer": None if optimizer_meta is None else json_value(dict(optimizer_meta)),
            "rng": None if rng_state is None else {"torch_cpu": encode_rng(rng_state)},
            "data": json_value(dict(data or {})),
            "extra": json_value(dict(extra or {})),
            "files": files,
        }
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
        write_bytes(tmp / MANIFEST, text.encode("utf-8"))
        fsync_dir(tmp)
        final = root / step_dir_name(step)
        old = None
        if final.exists():  # re-saving a step: move the old one aside, then drop it
            old = root / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        abort(tmp)
        raise
    _write_pointer(root, final.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep, final)
    return final


def save(
    root: str | os.PathLike[str],
    step: int,
    stages: Sequence[Mapping[str, Tensor]],
    *,
    optimizer: Mapping[str, Tensor] | None = None,
    optimizer_meta: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    balance: Sequence[int] | None = None,
    topology: Mapping[str, Any] | None = None,
    rng_state: Tensor | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a whole state from one process: ``stages[d]`` maps full-model names to shard
    ``d``'s tensors; ``optimizer`` maps ``<parameter>/<slot>`` to tensors, each going to the
    shard that holds the parameter. See :func:`commit` for the rest."""
    owner: dict[str, int] = {}
    for s, shard in enumerate(stages):
        for name in shard:
            if name in owner:
                raise ValueError(
                    f"tensor {name!r} is in stage {owner[name]} and stage {s}; every name must "
                    "belong to exactly one stage"
                )
            owner[name] = s
    per_shard: list[dict[str, Tensor]] = [{} for _ in stages]
    for key, t in (optimizer or {}).items():
        pname = key.rpartition(SLOT_SEP)[0]
        if pname not in owner:
            raise ValueError(
                f"optimizer tensor {key!r} belongs to no stage's parameters; name optimizer "
                "tensors '<parameter name>/<slot>' with the stage state's names"
            )
        per_shard[owner[pname]][key] = t
    tmp = begin(root, step)
    try:
        records = [
            write_shard(tmp, s, shard, None if optimizer is None else per_shard[s])
            for s, shard in enumerate(stages)
        ]
    except BaseException:
        abort(tmp)
        raise
    topo = dict(topology or {})
    if balance is not None:
        topo.setdefault("balance", [int(b) for b in balance])
    return commit(
        root,
        tmp,
        step,
        records,
        config=config,
        topology=topo,
        optimizer_meta=optimizer_meta,
        rng_state=rng_state,
        data=data,
        extra=extra,
        keep=keep,
    )


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    write_bytes(tmp, (name + "\n").encode("utf-8"))
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def _prune(root: Path, keep: int, current: Path) -> None:
    for p in root.iterdir():  # leftovers of crashed saves (never the one just written)
        if p.name.startswith(TMP_PREFIX) or p.name.startswith(f"{LATEST}.{TMP_PREFIX}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if keep <= 0:
        return
    found = [p for p in list_checkpoints(root) if p != current]
    found.append(current)
    found.sort(key=lambda p: int(STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]
    for p in found[:-keep]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)
