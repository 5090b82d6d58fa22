"""Optimizer state by parameter name, so it survives a change of topology.

``torch.optim`` numbers parameters by their position in the param groups, and that position
depends on which parameters a process holds (its stages) — a checkpoint keyed by position
could only resume on the same cut. Here every tensor slot is keyed ``<name>/<slot>``
(``block3.ff1.bias/exp_avg``) and every non-tensor slot sits under its parameter's name, where
the name is the full model's (``model.named_parameters()``).

The invariant: :func:`load_by_name` restores exactly the slots :func:`state_by_name` saved, for
whichever subset of the names this process's optimizer holds, and refuses names the model does
not have; the param groups' hyperparameters are the current optimizer's (a resumed run checks
that they equal the checkpoint's config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gpipe.state.codec import from_json, json_value
from gpipe.state.folder import SLOT_SEP, CheckpointError


def state_by_name(
    optimizer: torch.optim.Optimizer, names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's state as (tensors by ``<name>/<slot>``, metadata); ``names[i]`` names
    the i-th parameter in param-group order. The metadata holds the param groups (hyper-
    parameters and parameter names) and the non-tensor slots by name."""
    return flatten_optimizer(optimizer.state_dict(), names)


def load_by_name(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    tensors: Mapping[str, Tensor],
    scalars: Mapping[str, Mapping[str, Any]],
    known: set[str],
) -> None:
    """Restore the slots of the parameters ``names`` (param-group order) from a checkpoint's
    ``tensors`` and ``scalars``; ``known`` is every parameter name of the model, to refuse a
    checkpoint of another model. Slots of parameters this optimizer does not hold are
    ignored (another process restores them)."""
    for key in tensors:
        pname = key.rpartition(SLOT_SEP)[0]
        if pname not in known:
            raise CheckpointError(
                f"the saved optimizer state has {key!r} for a parameter the model does not "
                "have; the checkpoint is of another model"
            )
    current = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    position = {n: i for i, n in enumerate(names)}
    for key, t in tensors.items():
        name, _, slot = key.rpartition(SLOT_SEP)
        if name in position:
            state.setdefault(position[name], {})[slot] = t
    for name, slots in scalars.items():
        if name in position:
            state.setdefault(position[name], {}).update(from_json(dict(slots)))
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def merge_meta(metas: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """One metadata record from several processes' :func:`state_by_name` metadata: group
    ``g``'s parameter names are the union (in process order) and the scalars are merged."""
    groups: list[dict[str, Any]] = []
    scalars: dict[str, Any] = {}
    for meta in metas:
        if not meta:
            continue
        for g, group in enumerate(meta["param_groups"]):
            if g == len(groups):
                groups.append({**group, "params": []})
            groups[g]["params"] += [n for n in group["params"] if n not in groups[g]["params"]]
        scalars.update(meta.get("scalars", {}))
    return {"param_groups": groups, "scalars": scalars}


# ----------------------------------------------------------------------------- dict level


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
            {**{k: json_value(v) for k, v in g.items() if k != "params"}, "params": params}
        )
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, slots in state_dict["state"].items():
        name = index_to_name[int(i)]
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{name}{SLOT_SEP}{slot}"] = value
            else:
                scalars.setdefault(name, {})[slot] = json_value(value)
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
                **{k: from_json(v) for k, v in g.items() if k != "params"},
                "params": [position[n] for n in g["params"]],
            }
        )
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, slot = key.rpartition(SLOT_SEP)
        if name not in position:
            raise CheckpointError(
                f"the saved optimizer state has {key!r} for a parameter the model does not "
                "have; the checkpoint is of another model"
            )
        state.setdefault(position[name], {})[slot] = t
    for name, slots in meta.get("scalars", {}).items():
        if name in position:
            state.setdefault(position[name], {}).update(from_json(slots))
    return {"state": state, "param_groups": groups}
