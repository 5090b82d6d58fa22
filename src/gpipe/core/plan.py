"""The plan both pipes share: the layer sequence, the cut into stages and where each stage runs.

``gpipe.Pipe`` (threads in one process) and ``gpipe.DistributedPipe`` (one process per
pipeline device) differ only in how the device loops run and in what follows a step. What
defines the pipeline — which layers there are, how they are cut, which device runs which
stage, how the cut is balanced when none is given — is decided here, once, with one wording
for each mistake.

Where a stage runs is the schedule's fact (``ScheduleSpec.placement``, stage → device); the
default round-robin rule :func:`gpipe.schedules.device_of` is re-exported here.

The invariant: for the same model, options and sample micro-batch, both pipes get the same
layer list, the same balance and the same stage → device map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from gpipe.base import options
from gpipe.planner.balance import balance as balance_costs
from gpipe.planner.balance import flops_weights
from gpipe.schedules import device_of

if TYPE_CHECKING:
    from gpipe.stage.stage import Stage

__all__ = [
    "NotCopied",
    "auto_balance",
    "build_stages",
    "check_balance",
    "check_shared_placement",
    "cut_by",
    "device_of",
    "fetch_points",
    "flops_weights",
    "stage_of_layers",
]


class NotCopied:
    """A pipe is neither pickled nor copied: it holds worker threads, locks and (distributed)
    process groups, and its stages share the user's own layers. ``copy.copy``,
    ``copy.deepcopy``, ``pickle.dumps`` and ``torch.save`` of one say so and name what to
    save instead, rather than failing on a lock deep inside."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        who = type(self).__name__
        raise TypeError(
            f"a {who} cannot be pickled or copied (copy, deepcopy, pickle, torch.save): it "
            "holds worker threads and the model's own layers. Save its weights with "
            f"torch.save(pipe.state_dict(), path) and load them into a new {who} (or your "
            "model) with load_state_dict; to copy the model, copy the model you gave it, "
            f"then build a {who} from the copy"
        )


def cut_by(
    module: Any,
    balance: Sequence[int] | None,
    *,
    stages: int | None,
    virtual_stages: int,
    auto: bool,
) -> Sequence[int] | None:
    """The balance a pipe cuts by: the user's ``balance``, else the layers per stage that a
    captured model's ``split_points`` force — checked here against ``stages`` and
    ``schedule="auto"``, so that a disagreement names ``split_points`` and not a balance nobody
    gave."""
    from gpipe.capture import CapturedLayers

    split = module.split_balance if isinstance(module, CapturedLayers) else None
    if balance is not None and split is not None:
        raise ValueError(
            f"split_points cut the model into stages of {list(split)} layers, and balance="
            f"{list(balance) if isinstance(balance, Sequence) else balance!r} cuts it too; "
            "give one of them (split_points= by module path, or balance= by layer count)"
        )
    if balance is not None or split is None:
        return balance
    n, v = len(split), virtual_stages
    if auto:
        raise ValueError(
            f"split_points cut the model into {n} stages, but schedule='auto' chooses the cut "
            "itself; drop split_points= to let the planner cut, or name a schedule to keep them"
        )
    per = f" x {v} virtual stages" if v > 1 else ""
    if n % v:
        raise ValueError(
            f"split_points cut the model into {n} stages, which {v} virtual stages per device "
            f"cannot share out; give {v * (n // v + 1) - 1} split points (a multiple of {v} "
            "stages) or another virtual_stages"
        )
    if stages is not None and stages * v != n:
        raise ValueError(
            f"split_points cut the model into {n} stages, but stages={stages}{per} asks for "
            f"{stages * v}; drop stages= (the split points decide it) or give "
            f"{stages * v - 1} split points"
        )
    return split


def check_balance(
    balance: Any, num_layers: int, num_devices: int, virtual_stages: int, pinned: int = 0
) -> list[int]:
    """A user's ``balance``: one layer count per (virtual) stage, adding up to the model."""
    try:
        return options.balance(balance, num_layers, num_devices * virtual_stages, pinned)
    except ValueError as e:
        if virtual_stages > 1 and "entries" in str(e):
            n = num_devices * virtual_stages
            raise ValueError(
                str(e).replace(
                    f"{n} stages",
                    f"{n} stages ({num_devices} devices x {virtual_stages} virtual stages)",
                )
            ) from None
        raise


def check_shared_placement(
    named: Sequence[tuple[str, nn.Module]],
    balance: Sequence[int],
    stage_devices: Sequence[Any],
) -> None:
    """A parameter used by layers of two stages (a module that appears twice, tied weights)
    is one tensor, so in one process those stages must share a device; refuse otherwise,
    before anything moves."""
    first: dict[int, tuple[str, Any]] = {}
    stage_of = stage_of_layers(balance)
    for (name, layer), s in zip(named, stage_of, strict=True):
        dev = stage_devices[s]
        for p in layer.parameters():
            seen = first.setdefault(id(p), (name, dev))
            if seen[1] != dev:
                raise ValueError(
                    f"layers {seen[0]!r} and {name!r} share a parameter (the same module or "
                    f"tied weights) but their stages are on {seen[1]} and {dev}; give a "
                    "balance=[...] that puts both on one device, or use "
                    "DistributedPipe(tied=...), which keeps tied copies in sync"
                )


def fetch_points(
    named: Sequence[tuple[str, nn.Module]], names: Sequence[str]
) -> dict[int, dict[str, nn.Module]]:
    """Where each ``fetch`` name is: layer index → {name: inner module}. A name is a path as
    in the model's ``named_modules()`` (``"3"``, ``"3.attn"``); an unknown one is refused."""
    index = {n: i for i, (n, _) in enumerate(named)}
    out: dict[int, dict[str, nn.Module]] = {}
    for fname in names:
        top, _, rest = fname.partition(".")
        module = None
        if top in index:
            layer = named[index[top]][1]
            module = dict(layer.named_modules()).get(rest) if rest else layer
        if module is None:
            known = [f"{n}.{m}" if m else n for n, layer in named for m, _ in layer.named_modules()]
            raise ValueError(
                f"fetch names {fname!r}, which is not a module of the model; names look like "
                f"{known[:5]}"
            )
        out.setdefault(index[top], {})[fname] = module
    return out


def auto_balance(
    layers: Sequence[nn.Module],
    sample_microbatch: tuple,
    num_stages: int,
    *,
    pinned: int = 0,
    train: bool = True,
) -> tuple[list[int], list[int]]:
    """The balance by FLOPs from :func:`gpipe.planner.cost.profile` on one micro-batch (nothing runs),
    and each stage's forward FLOPs."""
    from gpipe.planner.cost import profile

    costs = profile(list(layers), *sample_microbatch, train=train)
    if _captured(layers):  # fine-grained layers: cut where little crosses, within 5% of best
        from gpipe.planner.cuts import balance_small_boundaries

        crossing = [c.activation_bytes for c in costs]
        counts = balance_small_boundaries(flops_weights(costs), crossing, num_stages, pinned=pinned)
    else:
        counts = balance_costs(flops_weights(costs), num_stages, pinned=pinned)
    flops, i = [], 0
    for b in counts:
        flops.append(sum(c.flops for c in costs[i : i + b]))
        i += b
    return counts, flops


def _captured(layers: Sequence[nn.Module]) -> bool:
    from gpipe.capture import Segment

    return any(isinstance(layer, Segment) for layer in layers)


def stage_of_layers(balance: Sequence[int]) -> list[int]:
    """The stage of each layer, in order."""
    return [s for s, count in enumerate(balance) for _ in range(count)]


def build_stages(
    named: Sequence[tuple[str, nn.Module]],
    balance: Sequence[int],
    num_devices: int,
    device: Callable[[int], Any],
    *,
    remat: str,
    seed: int,
    fetch_at: dict[int, dict[str, nn.Module]],
    only_device: int | None = None,
    placement: Sequence[int] | None = None,
) -> list[Stage]:
    """The :class:`~gpipe.stage.stage.Stage` of every (virtual) stage — or, with ``only_device``,
    of those that pipeline device runs by ``placement`` (stage → device, the schedule's
    placement, required then) — each on ``device(stage)``, its layers moved there."""
    from gpipe.stage.stage import Stage

    n_stages = len(balance)
    place = placement
    if only_device is not None and (place is None or len(place) != n_stages):
        raise ValueError(
            f"build_stages(only_device={only_device}) needs the schedule's placement of all "
            f"{n_stages} stages (ScheduleSpec.placement), got {placement!r}"
        )
    stage_of = stage_of_layers(balance)
    stages = []
    for s in range(n_stages):
        if only_device is not None and place is not None and place[s] != only_device:
            continue
        dev = device(s)
        idx = [i for i, st in enumerate(stage_of) if st == s]
        for i in idx:
            named[i][1].to(dev)
        stages.append(
            Stage(
                s,
                [(i, named[i][1]) for i in idx],
                dev,
                is_first=s == 0,
                is_last=s == n_stages - 1,
                remat=remat,
                seed=seed,
                fetch={n: m for i in idx for n, m in fetch_at.get(i, {}).items()},
            )
        )
    return stages
