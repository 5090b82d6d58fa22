"""Saved training state (the ``save``/``load`` kind of checkpoint; ``remat`` is the other kind).

A saved state is one folder per step holding the model's tensors and the optimizer's slots by
*parameter name* (the full model's names), in shards written by whichever processes held them,
plus a manifest recording the topology it was written with. Because nothing is keyed by stage
index, a state written with K stages under one runtime resumes with K' stages under the other.

* :mod:`gpipe.state.folder` — the on-disk layout and the crash-safe write (begin, shards,
  commit), usable by one process or by every rank of a distributed run;
* :mod:`gpipe.state.read` — verify, load (optionally only the shards a rank needs), export;
* :mod:`gpipe.state.optim` — optimizer state by parameter name;
* :mod:`gpipe.state.codec` — non-tensor state (RNG, tuples) as JSON.

The invariant: the folder ``ROOT/latest`` names is complete and verified whatever moment a save
is interrupted at, and nothing is ever unpickled.
"""

from gpipe.state.codec import decode_rng, encode_rng
from gpipe.state.folder import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    NoSpaceError,
    ShardRecord,
    abort,
    begin,
    clear,
    commit,
    latest,
    list_checkpoints,
    raise_if_full,
    replace_root,
    save,
    staging_root,
    write_shard,
)
from gpipe.state.optim import (
    flatten_optimizer,
    load_by_name,
    merge_meta,
    state_by_name,
    unflatten_optimizer,
)
from gpipe.state.read import (
    Checkpoint,
    check_parameters,
    export,
    load,
    read_manifest,
    resolve,
    topology_of,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "NoSpaceError",
    "ShardRecord",
    "abort",
    "begin",
    "check_parameters",
    "clear",
    "commit",
    "decode_rng",
    "encode_rng",
    "export",
    "flatten_optimizer",
    "latest",
    "list_checkpoints",
    "load",
    "load_by_name",
    "merge_meta",
    "raise_if_full",
    "read_manifest",
    "replace_root",
    "resolve",
    "save",
    "staging_root",
    "state_by_name",
    "topology_of",
    "unflatten_optimizer",
    "write_shard",
]
