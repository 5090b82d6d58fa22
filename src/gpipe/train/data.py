"""Byte-level text corpora and deterministic batching.

The bundled corpus is the Python standard library's own source (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, without site-packages, test folders or undecodable files),
so every Python install has it. A token is a byte (vocabulary 256).

The invariant: everything here is a pure function of its arguments — the same files, the same
``val_fraction``/``max_bytes`` and the same ``(seed, step)`` give bit-identical tensors, and no
function touches the global RNG. Files go to train or validation by a stable hash of their
relative path, never by position, so the two splits share no file.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VAL_BYTES",
    "STDLIB_EXCLUDED_DIRS",
    "Corpus",
    "get_batch",
    "load_corpus",
    "unigram_entropy",
]

DEFAULT_MAX_BYTES = 8 * 2**20
"""Default cap on the training split, in bytes (8 MiB)."""

DEFAULT_MAX_VAL_BYTES = 2**20
"""Default cap on the validation split, in bytes (1 MiB); independent of the train cap."""

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
"""Folder names skipped anywhere below the stdlib root (tests are not representative prose)."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """A byte corpus split by file: ``train``/``val`` are 1-D ``uint8`` tensors of byte ids.

    ``train_files``/``val_files`` are the relative paths concatenated, in order, into each
    split; ``description`` says where the bytes came from and how many there are.
    """

    train: Tensor
    val: Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    description: str

    vocab_size: int = 256


def _hash_unit(rel: str) -> float:
    """A stable number in [0, 1) for a relative path (same on every machine and run)."""
    digest = hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest()
    return struct.unpack(">Q", digest)[0] / 2.0**64


def _read_text(path: Path) -> bytes | None:
    """The file's bytes if it is UTF-8 text without NUL bytes, else ``None``."""
    try:
        data = path.read_bytes()
        if b"\x00" in data:
            return None
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return data


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return root, sorted(rels)


def _folder_files(root: Path) -> list[str]:
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if not name.startswith("."):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(rels)


def _take(root: Path, rels: list[str], cap: int) -> tuple[list[str], bytes]:
    """Read files in the given order, skipping non-text ones, until ``cap`` bytes are held.

    The files kept are returned and concatenated in sorted path order; the concatenation is cut
    to at most ``cap`` bytes (so the last file may be partial).
    """
    kept: dict[str, bytes] = {}
    total = 0
    for rel in rels:
        if total >= cap:
            break
        data = _read_text(root / rel)
        if data:
            kept[rel] = data
            total += len(data)
    order = sorted(kept)
    return order, b"".join(kept[r] for r in order)[:cap]


def _to_tensor(data: bytes) -> Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.05,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_val_bytes: int = DEFAULT_MAX_VAL_BYTES,
) -> Corpus:
    """Load a byte corpus: the stdlib sources (``path=None``), one text file, or a folder.

    Files (a folder is read recursively; hidden entries, binary and non-UTF-8 files are skipped)
    go to validation when the stable hash of their relative path falls below ``val_fraction``;
    if that leaves validation empty, the file with the smallest hash goes there. Each split is
    filled in hash order until it holds ``max_bytes`` (train) or ``max_val_bytes`` (val), so a
    cap picks a deterministic, spread-out subset and the validation split does not change with
    ``max_bytes``; the kept files are concatenated in sorted path order and cut to the cap (the
    last one may be partial). A single text file
    is split by position instead: its last ``val_fraction`` of bytes form the validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if max_bytes < 1 or max_val_bytes < 1:
        raise ValueError(
            f"max_bytes and max_val_bytes must be positive, got max_bytes={max_bytes!r}, "
            f"max_val_bytes={max_val_bytes!r}."
        )

    if path is not None and not str(path).strip():  # Path("") would mean the current folder
        raise ValueError(
            "corpus path is empty; pass a UTF-8 text file or a folder of text files, or no path "
            "for the bundled stdlib corpus."
        )
    if path is None:
        root, rels = _stdlib_files()
        source = f"Python {sysconfig.get_python_version()} stdlib sources at {root}"
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"corpus path {str(root)!r} does not exist; pass a UTF-8 text file or a folder "
                "of text files, or no path for the bundled stdlib corpus."
            )
        if root.is_file():
            return _single_file(root, val_fraction, max_bytes, max_val_bytes)
        rels = _folder_files(root)
        source = f"text files under {root}"

    keyed = sorted(rels, key=lambda r: (_hash_unit(r), r))
    val_rels = [r for r in keyed if _hash_unit(r) < val_fraction]
    if not val_rels and val_fraction > 0 and len(keyed) > 1:
        val_rels = keyed[:1]
    val_set = set(val_rels)
    train_rels = [r for r in keyed if r not in val_set]

    train_files, train_bytes = _take(root, train_rels, max_bytes)
    val_files, val_bytes = _take(root, val_rels, max_val_bytes)
    if not train_bytes:
        raise ValueError(
            f"no usable text in {source} ({len(rels)} files seen, "
            f"{len(val_files)} went to validation); the corpus needs UTF-8 text files without "
            "NUL bytes, and at least one of them outside the validation split."
        )
    description = (
        f"{source}: train {len(train_files)} files, {len(train_bytes):,} bytes; "
        f"val {len(val_files)} files, {len(val_bytes):,} bytes "
        f"(val_fraction={val_fraction}, max_bytes={max_bytes:,}, max_val_bytes={max_val_bytes:,})"
    )
    return Corpus(
        train=_to_tensor(train_bytes),
        val=_to_tensor(val_bytes),
        train_files=tuple(train_files),
        val_files=tuple(val_files),
        description=description,
    )


def _single_file(path: Path, val_fraction: float, max_bytes: int, val_cap: int) -> Corpus:
    data = _read_text(path)
    if not data:
        raise ValueError(
            f"corpus file {str(path)!r} is empty, binary or not UTF-8; pass a UTF-8 text file."
        )
    n_val = min(int(len(data) * val_fraction), val_cap)
    train, val = data[: len(data) - n_val][:max_bytes], data[len(data) - n_val :]
    description = (
        f"text file {path}: train {len(train):,} bytes (head), val {len(val):,} bytes (tail) "
        f"(val_fraction={val_fraction}, max_bytes={max_bytes:,})"
    )
    return Corpus(
        train=_to_tensor(train),
        val=_to_tensor(val),
        train_files=(path.name,),
        val_files=(path.name,) if val else (),
        description=description,
    )


def unigram_entropy(tokens: Tensor, vocab_size: int = 256) -> float:
    """Entropy of the token frequency distribution, **in nats** (divide by ln 2 for bits).

    This is the cross-entropy a model that ignores context can reach at best: the baseline a
    language model's loss (also in nats, see ``gpipe.models.lm_loss``) must beat.
    """
    flat = tokens.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("unigram_entropy of an empty tensor is undefined; pass some tokens.")
    counts = torch.bincount(flat.long(), minlength=vocab_size).double()
    p = counts[counts > 0] / flat.numel()
    return float(-(p * p.log()).sum())


def _batch_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(struct.pack(">qq", seed, step), digest_size=8).digest()
    return struct.unpack(">Q", digest)[0] >> 1


def get_batch(
    tokens: Tensor,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``seq_len + 1`` tokens → ``(inputs, targets)``.

    Both are int64 ``[batch_size, seq_len]`` with ``targets[:, t] == inputs[:, t + 1]`` along
    the window. Window starts are drawn from a local ``torch.Generator`` seeded by a hash of
    ``(seed, step)``: the same pair always gives the same batch, and the global RNG is untouched.
    """
    if tokens.dim() != 1:
        raise ValueError(f"get_batch expects a 1-D token tensor, got shape {tuple(tokens.shape)}.")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"batch_size and seq_len must be positive, got batch_size={batch_size}, "
            f"seq_len={seq_len}."
        )
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(
            f"corpus has {n} tokens but a window needs seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or a larger corpus."
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_batch_seed(seed, step))
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
    window = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    chunk = tokens.cpu()[window].long()
    inputs, targets = chunk[:, :-1], chunk[:, 1:]
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs.contiguous(), targets.contiguous()
