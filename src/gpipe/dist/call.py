"""What every rank of a distributed pipe must agree on at each step: the call itself.

``DistributedPipe.step`` runs one pipeline over several processes, each given its own
arguments. Ranks that were given different batches (each drew its own, or a data loader
sharded them as for DDP), or that differ in ``train()``/``eval()`` or in grad mode, would
otherwise train silently on a mixture: rank 0's inputs paired with rank 1's targets, a stage
that drops nothing, random-stream steps that drift apart. So once per step, before any stage
state changes, every rank describes its call as a few integers (:func:`describe`: the mode,
grad, its micro-batch count, the rows and a checksum of its inputs and targets), the ranks
exchange them in one bounded all-gather on a CPU group, and :func:`check` raises on every
rank, naming the ranks and what differs.

``batch`` says what the ranks are given (:data:`BATCH_MODES`): ``"same"``, the whole global
mini-batch on every rank (each replica takes its share of it); ``"per_replica"``, each
data-parallel replica its own shard (the same on every rank of that replica's pipeline),
which its pipeline splits into micro-batches itself. The batches are compared within the
ranks that must hold the same one: all of them, or those of one replica.

The invariant: :func:`check` returns on one rank only if it returns on every rank, with the
same :class:`Agreed` everywhere; a checksum is a function of the tensors' bytes, shapes and
dtypes only (exact integer sums, modulo 2**64: the same on every rank and device, however
many threads sum them). It reads every row, but of a large tensor only a spread of each row's
words (at most 2**18 words in all), so the check costs little whatever the inputs' size: a
guard against different batches, not a proof that two batches are equal byte for byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpipe.base.microbatch import batch_size, tree_flatten
from gpipe.dist import agree

__all__ = ["BATCH_MODES", "Agreed", "check", "check_batch_mode", "checksum", "describe"]

BATCH_MODES = ("same", "per_replica")

_ABSENT = -1  # rows of a batch a rank was not given
_READ = 1 << 18  # words a checksum reads at most (beyond 16 a row)
_MASK = (1 << 63) - 1  # checksums are kept in [0, 2**63): an int64 holds them
_TRAINING, _GRAD, _FAILED, _M, _X_ROWS, _X_SUM, _Y_ROWS, _Y_SUM = range(8)


def check_batch_mode(batch: Any) -> str:
    """``batch=`` of :class:`gpipe.DistributedPipe`: one of :data:`BATCH_MODES`."""
    if isinstance(batch, str) and batch in BATCH_MODES:
        return batch
    raise ValueError(
        f"batch must be 'same' (every rank gets the whole global mini-batch; each "
        f"data-parallel replica takes its share) or 'per_replica' (each replica gets its own "
        f"shard, as with DDP and a DistributedSampler), got {batch!r}"
    )


def _words(t: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """``t``'s bytes as integers (int64, exact), one row per batch row; of rows longer than
    :data:`_READ` words allow, evenly spaced words only (``_READ`` in all, at least 16 a
    row): different batches differ in nearly every word, and the check stays cheap on large
    inputs such as images."""
    t = t.detach()
    if t.dim() > 0:
        t = t.movedim(batch_dim, 0)
    t = t.contiguous().reshape(max(1, t.shape[0]) if t.dim() else 1, -1)
    size = t.element_size()
    if t.is_complex() or size % 4 == 0:
        word = torch.int32
    else:
        word = {1: torch.uint8, 2: torch.int16}[size]
    w = t.view(word)
    per_row = max(16, _READ // w.shape[0])
    if w.shape[1] > per_row:
        w = w[:, :: -(-w.shape[1] // per_row)]
    return w.long()


def _leaf_sum(t: torch.Tensor, batch_dim: int) -> int:
    """An order-sensitive integer sum of one tensor: the rows weighted by their position, and
    each row's words by theirs, so swapped rows or reordered values change it."""
    w = _words(t, batch_dim)
    if w.numel() == 0:
        return 0
    rows = torch.arange(1, w.shape[0] + 1, device=w.device)
    cols = torch.arange(w.shape[1], device=w.device) % 1021 + 1
    by_row = (w.sum(1) * rows).sum()
    by_col = (w.sum(0) * cols).sum()
    a, b = torch.stack([by_row, by_col]).tolist()  # one transfer from a GPU
    return (a * 1_000_003 + b) & _MASK


def checksum(obj: Any, batch_dim: int) -> int:
    """A cheap fingerprint of a pytree of tensors: every leaf's path, shape, dtype and an
    integer sum of its bytes (:func:`_leaf_sum`; of a large tensor, a spread of them);
    plain non-tensor leaves (numbers, strings) by their ``repr``, other objects by type.
    Two ranks given the same values get the same number, on any device."""
    h = 0
    for path, leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            head = f"{path} {tuple(leaf.shape)} {leaf.dtype}"
            value = _leaf_sum(leaf, batch_dim)
        elif leaf is None or isinstance(leaf, (bool, int, float, str, bytes)):
            head, value = f"{path} {leaf!r}", 0
        else:  # another object: its type only (a repr may hold an address, alike nowhere)
            head, value = f"{path} {type(leaf).__qualname__}", 0
        h = (h * 1_000_000_007 + zlib.crc32(head.encode()) + value) & _MASK
    return h


def describe(
    inputs: Any,
    targets: Any,
    *,
    training: bool,
    grad: bool,
    num_microbatches: int | None,
    batch_dim: int,
) -> list[int]:
    """This rank's call as integers: mode, grad, M (``None``: the rank's arguments were bad,
    its own error follows), and the rows and checksum of its inputs and targets (rows
    ``-1`` where it passed ``None``)."""

    def part(obj: Any, wrap: bool) -> list[int]:
        if obj is None:
            return [_ABSENT, 0]
        try:
            rows = batch_size((obj,) if wrap else obj, batch_dim)
        except Exception:  # a bad batch: its own error is raised by the step
            return [_ABSENT, 0]
        try:
            return [rows, checksum(obj, batch_dim)]
        except Exception:  # tensors it cannot read (sparse, say): compared by rows only
            return [rows, 0]

    failed = num_microbatches is None
    return [
        int(training),
        int(grad),
        int(failed),
        0 if failed else int(num_microbatches),
        *part(inputs, True),
        *part(targets, False),
    ]


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed on: each replica's rows and micro-batch count (``None`` where
    a rank of it failed to prepare its batch)."""

    rows: list[int | None]
    microbatches: list[int | None]

    def offset(self, replica: int) -> int:
        """The first micro-batch of ``replica`` in the whole global batch (the keyed random
        streams' numbering): the micro-batches of the replicas before it."""
        return sum(m or 0 for m in self.microbatches[:replica])


def _mode_problems(every: Sequence[Sequence[int]]) -> list[str]:
    out = []
    words = {1: "train()", 0: "eval()"}
    for r, row in enumerate(every):
        if row[_TRAINING] != every[0][_TRAINING]:
            out.append(
                f"rank {r} is in {words[row[_TRAINING]]} while rank 0 is in "
                f"{words[every[0][_TRAINING]]}"
            )
    for r, row in enumerate(every):
        if row[_GRAD] != every[0][_GRAD]:
            how = "with grad" if row[_GRAD] else "without grad (torch.no_grad)"
            other = "with grad" if every[0][_GRAD] else "without grad"
            out.append(f"rank {r} runs {how} while rank 0 runs {other}")
    return out


def _batch_problems(every: Sequence[Sequence[int]], ranks: Sequence[int]) -> list[str]:
    """Differences between the batches of ``ranks`` (which must hold the same one): one line
    per rank whose rows, micro-batch count or checksums differ from the first such rank's."""
    out = []

    def rows_of(r: int) -> int:
        row = every[r]
        return row[_X_ROWS] if row[_X_ROWS] != _ABSENT else row[_Y_ROWS]

    sized = [r for r in ranks if rows_of(r) != _ABSENT]
    for r in sized[1:]:
        if rows_of(r) != rows_of(sized[0]):
            out.append(
                f"rank {r}'s batch has {rows_of(r)} rows but rank {sized[0]}'s has "
                f"{rows_of(sized[0])}"
            )
    if out:
        return out
    counted = [r for r in ranks if not every[r][_FAILED]]
    for r in counted[1:]:
        if every[r][_M] != every[counted[0]][_M]:
            out.append(
                f"rank {r} would run {every[r][_M]} micro-batches but rank {counted[0]} "
                f"{every[counted[0]][_M]}"
            )
    differs: dict[tuple[int, int], list[str]] = {}
    for what, rows, value in (("inputs", _X_ROWS, _X_SUM), ("targets", _Y_ROWS, _Y_SUM)):
        given = [r for r in ranks if every[r][rows] != _ABSENT]
        for r in given[1:]:
            if every[r][value] != every[given[0]][value]:
                differs.setdefault((r, given[0]), []).append(
                    f"{what} checksum {every[r][value]:x} vs {every[given[0]][value]:x}"
                )
    for (r, first), parts in differs.items():
        out.append(f"rank {r}'s batch differs from rank {first}'s ({', '.join(parts)})")
    return out


def check(
    mine: list[int],
    *,
    group: Any,
    batch: str,
    num_devices: int,
    data_parallel: int,
    timeout: float,
    rank: int,
) -> Agreed:
    """Exchange ``mine`` (:func:`describe`) with every rank of ``group`` (all ``K·D`` ranks
    of the pipe; ``None`` for one rank) and raise ``ValueError`` on every rank if the modes,
    grad, or the batches that must be equal differ; else return the replicas' rows and
    micro-batch counts."""
    if group is None:
        every = [mine]
    else:
        every = agree.gather_ints(mine, group, timeout, rank, "to start the step")
    k = num_devices
    scopes = [list(range(len(every)))]
    need = "the same mini-batch on every rank"
    if batch == "per_replica":
        scopes = [list(range(j * k, (j + 1) * k)) for j in range(data_parallel)]
        need = "the same shard on every rank of one replica's pipeline (batch='per_replica')"
    elif data_parallel > 1:
        need += (
            " (each data-parallel replica takes its share); to give each replica its own "
            "shard use DistributedPipe(..., batch='per_replica')"
        )
    batches = []
    for ranks in scopes:
        found = _batch_problems(every, ranks)
        if found and batch == "per_replica":
            found[-1] += f" (replica {ranks[0] // k}: ranks {ranks[0]}..{ranks[-1]})"
        batches += found
    if batches:
        batches[-1] += f": DistributedPipe needs {need}"
    problems = _mode_problems(every) + batches
    if problems:
        raise ValueError("; ".join(problems))
    rows: list[int | None] = []
    microbatches: list[int | None] = []
    for j in range(data_parallel):
        mine_j = every[j * k : (j + 1) * k]
        failed = any(row[_FAILED] for row in mine_j)
        sizes = [max(row[_X_ROWS], row[_Y_ROWS]) for row in mine_j]
        rows.append(None if failed or max(sizes) < 0 else max(sizes))
        microbatches.append(None if failed else mine_j[0][_M])
    return Agreed(rows, microbatches)
