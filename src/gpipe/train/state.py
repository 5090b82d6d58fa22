"""Saving and restoring a training run's state, by parameter name, from one or many processes.

:func:`save_state` and :func:`restore_state` run the same code in one process (the local
runtime) and on every rank of a distributed run: the pipe's collectives
(:meth:`gpipe.train.pipe.TrainerPipe.gather`) are trivial in the first case. A save is the
crash-safe protocol of :mod:`gpipe.state.folder`, spread over the processes:

1. the main process creates the temporary folder (and, for a fresh run's first save over an
   earlier run's folder, the staging root) and tells the others where it is;
2. every process that holds a shard (data-parallel replica 0) writes its own model tensors and
   optimizer slots there, fsynced, and sends the main process their records;
3. once every shard is written the main process writes the one manifest, renames the folder
   into place, points ``latest`` at it (and moves the earlier run's folder aside).

Each stage ends in a gather bounded by the pipe's timeout; a failure anywhere makes every
process raise (the failing process its own error, the others a :class:`CheckpointError`
naming that rank) and the temporary folder is removed, so ``latest`` still names the last
complete save.

The invariant: a saved state depends only on the model and the training position, never on
the cut — tensors and optimizer slots are keyed by the full model's parameter names, and the
manifest records the topology only as information — so a state written with K stages under one
runtime restores, bit for bit, with K' stages under either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpipe import state as st

__all__ = ["restore_state", "save_state"]


def _together(pipe: Any, fn: Callable[[], Any], on_error: Callable[[], None] | None = None) -> list:
    """Run ``fn`` on every process; return every process's result, or raise on all of them
    when any failed (``on_error`` runs first, on the main process)."""
    error: BaseException | None = None
    value = None
    try:
        value = fn()
    except Exception as e:
        error = e
    rows = pipe.gather((value, None if error is None else f"{type(error).__name__}: {error}"))
    failed = [(rank, text) for rank, (_, text) in enumerate(rows) if text is not None]
    if failed:
        if on_error is not None and pipe.is_main:
            on_error()
        if error is not None:
            raise error
        rank, text = failed[0]
        raise st.CheckpointError(f"rank {rank} failed: {text}")
    return [v for v, _ in rows]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def save_state(
    pipe: Any,
    root: Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    *,
    staging: bool,
    config: Mapping[str, Any],
    data: Mapping[str, Any],
    extra: Mapping[str, Any],
    keep: int,
) -> tuple[Path, Path | None]:
    """Save the run at ``step`` under ``root``; return (the step folder, where the earlier
    run's folder was moved, if ``staging``). ``names[i]`` names the optimizer's i-th
    parameter. Call on every process."""
    main = pipe.is_main

    def start() -> tuple[str, str] | None:
        if not main:
            return None
        where = st.staging_root(root) if staging else root
        return str(where), str(st.begin(where, step))

    where_s, tmp_s = _together(pipe, start)[0]
    where, tmp = Path(where_s), Path(tmp_s)

    def cleanup() -> None:
        st.abort(tmp)
        if staging:
            import shutil

            shutil.rmtree(where, ignore_errors=True)

    def write() -> tuple[list[st.ShardRecord], dict[str, Any] | None]:
        shards = pipe.shards()
        if not shards:
            return [], None
        tensors, meta = st.state_by_name(optimizer, names)
        owned = {n for _, shard in shards for n in shard}
        slots = {k: t for k, t in tensors.items() if k.rpartition("/")[0] in owned}
        records = []
        try:
            for index, shard in shards:
                mine = {k: t for k, t in slots.items() if k.rpartition("/")[0] in shard}
                records.append(st.write_shard(tmp, index, shard, mine))
        except OSError as e:
            need = sum(_nbytes(t) for _, shard in shards for t in shard.values())
            st.raise_if_full(e, root, step, need + sum(_nbytes(t) for t in slots.values()))
            raise
        meta["param_groups"] = [
            {**g, "params": [n for n in g["params"] if n in owned]} for g in meta["param_groups"]
        ]
        meta["scalars"] = {n: v for n, v in meta["scalars"].items() if n in owned}
        return records, meta

    written = _together(pipe, write, on_error=cleanup)

    def finish() -> tuple[str, str | None] | None:
        if not main:
            return None
        records = [r for recs, _ in written for r in recs]
        try:
            path = st.commit(
                where,
                tmp,
                step,
                records,
                config=config,
                topology=pipe.topology(),
                optimizer_meta=st.merge_meta([m for _, m in written]),
                rng_state=torch.get_rng_state(),
                data=data,
                extra=extra,
                keep=keep,
            )
        except BaseException as e:
            cleanup()
            if isinstance(e, OSError):  # the manifest, once every shard is written
                need = sum(f["bytes"] for r in records for f in r.files.values())
                st.raise_if_full(e, root, step, need)
            raise
        if not staging:
            return str(path), None
        aside = st.replace_root(root, where)
        return str(root / path.name), str(aside)

    path_s, aside_s = _together(pipe, finish)[0]
    return Path(path_s), None if aside_s is None else Path(aside_s)


def restore_state(
    pipe: Any,
    ckpt_dir: Path,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    model_state: Mapping[str, Tensor],
    check: Callable[[Path, dict[str, Any]], None],
) -> st.Checkpoint:
    """Load the latest state under ``ckpt_dir`` into this process's tensors and optimizer
    (``names`` as in :func:`save_state`); ``model_state`` is the full model's ``state_dict``
    (shapes only are used) and ``check(folder, manifest)`` refuses a checkpoint of another config before
    anything is loaded. Call on every process; each reads only the shards it needs. Returns
    the checkpoint (the torch RNG and the pipe's ``rng_step`` are restored too)."""
    local = pipe.local_state()
    mine = set(local) | set(names)  # a tied copy's optimizer slots sit with its original

    def load() -> st.Checkpoint:
        folder, manifest = st.read_manifest(ckpt_dir)
        check(folder, manifest)
        ckpt = st.load(folder, want=mine.__contains__)
        st.check_parameters(ckpt, model_state)
        saved = ckpt.state_dict
        with torch.no_grad():
            for name, t in local.items():
                t.copy_(saved[name])
        scalars = (ckpt.manifest.get("optimizer") or {}).get("scalars", {})
        st.load_by_name(optimizer, names, ckpt.optimizer, scalars, set(model_state))
        rng = (ckpt.manifest.get("rng") or {}).get("torch_cpu")
        if rng is not None:
            torch.set_rng_state(st.decode_rng(rng))
        pipe.rng_step = int(ckpt.manifest.get("extra", {}).get("pipe_rng_step", ckpt.step))
        return ckpt

    result: dict[str, st.Checkpoint] = {}

    def run() -> None:
        result["ckpt"] = load()

    _together(pipe, run)
    return result["ckpt"]
