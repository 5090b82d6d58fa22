"""The GPipe Transformer language model, as one flat sequence of layers.

``TransformerLM`` is an ``nn.Sequential`` whose children are ``Embedding``, ``n_layers`` ×
``Block`` and ``Head``, so the pipeline library can cost, balance and cut it between any two
children. The invariant: every child takes exactly one tensor and returns exactly one tensor
(token ids ``[batch, seq]`` → hidden ``[batch, seq, d_model]`` → … → logits
``[batch, seq, vocab]``), and no child reads another child's state at run time except through
the shared ``Parameter`` of tied embeddings.

Random ops are plain ``nn.Dropout`` modules (never the ``dropout_p`` of fused attention), so
the pipeline's random streams can replay them during re-materialization.

Initialization lives in each child's ``reset_parameters()``; the model may be built on the meta
device at any size (nothing allocated) and a child materialized later with
``child.to_empty(device=...)`` followed by :func:`init_weights` (or ``child.reset_parameters()``).
Given ``torch.manual_seed``, construction is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Block",
    "Embedding",
    "Head",
    "TransformerConfig",
    "TransformerLM",
    "init_weights",
    "lm_loss",
    "sinusoidal_positions",
]

_LINEAR_STD = 0.02


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of :class:`TransformerLM`; validated on construction.

    ``tie_embeddings=True`` makes the output projection reuse the token-embedding matrix (the
    seed keeps them separate, hence the default ``False``). Named configurations come from
    :meth:`preset`.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 4
    max_seq_len: int = 128
    dropout: float = 0.1
    tie_embeddings: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # For unit tests: a few thousand parameters, runs in milliseconds.
        "tiny": dict(vocab_size=256, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_seq_len=32),
        # For a ~5-minute CPU training run on two cores over the byte-level corpus.
        "small": dict(
            vocab_size=256, d_model=128, n_heads=4, d_ff=512, n_layers=4, max_seq_len=128
        ),
        # The seed's one-billion-words configuration (untied softmax).
        "1b-words": dict(
            vocab_size=32000,
            d_model=2048,
            n_heads=16,
            d_ff=8192,
            n_layers=32,
            max_seq_len=1024,
            tie_embeddings=False,
        ),
    }

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"TransformerConfig.{name} must be a positive int, got {value!r}; "
                    f"pass e.g. {name}={self._example(name)}."
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} is not divisible by "
                f"n_heads={self.n_heads}; choose n_heads among the divisors of d_model "
                f"(e.g. {self._head_divisors()})."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(
                f"TransformerConfig.dropout must be in [0, 1), got {self.dropout!r}; "
                "use 0.0 to disable dropout."
            )

    def _example(self, name: str) -> int:
        return int(self.PRESETS["tiny"][name])

    def _head_divisors(self) -> list[int]:
        return [h for h in (1, 2, 4, 8, 16, 32) if self.d_model % h == 0]

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``d_model // n_heads``)."""
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named configuration (``"tiny"``, ``"small"``, ``"1b-words"``), fields overridable."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown TransformerConfig preset {name!r}; choose one of {sorted(cls.PRESETS)}."
            )
        fields = {**cls.PRESETS[name], **overrides}
        unknown = set(fields) - set(asdict(cls()))
        if unknown:
            raise ValueError(
                f"unknown TransformerConfig field(s) {sorted(unknown)}; "
                f"valid fields are {sorted(asdict(cls()))}."
            )
        return cls(**fields)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def sinusoidal_positions(
    seq_len: int, d_model: int, *, device: torch.device | str | None = None
) -> Tensor:
    """The Transformer's fixed sinusoidal position table, ``[seq_len, d_model]`` in float32.

    Even columns hold ``sin(pos / 10000^(2i/d))`` and odd columns the matching ``cos``; an odd
    ``d_model`` drops the last cosine column.
    """
    pos = torch.arange(seq_len, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
        * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(seq_len, d_model, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


class Embedding(nn.Module):
    """Cell 0: token ids ``[B, T]`` → ``emb(ids) · √d_model + positions`` → dropout.

    Positions are computed on the fly (not stored), so there is no buffer to forget when the
    cell is materialized from the meta device.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.scale = math.sqrt(config.d_model)
        self.reset_parameters()

    @property
    def weight(self) -> nn.Parameter:
        """The token-embedding matrix ``[vocab, d_model]`` (shared with the head when tied)."""
        return self.tok.weight

    def reset_parameters(self) -> None:
        """Token embeddings ~ N(0, 1/d_model), so that scaled rows have unit variance."""
        with torch.no_grad():
            nn.init.normal_(self.tok.weight, std=self.config.d_model**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(
                f"Embedding expects integer token ids of shape [batch, seq], got "
                f"{tuple(tokens.shape)} {tokens.dtype}; pass a LongTensor of byte/token ids."
            )
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}; "
                "use shorter windows or build the model with a larger max_seq_len."
            )
        x = self.tok(tokens.long()) * self.scale
        pos = sinusoidal_positions(seq, self.config.d_model, device=x.device)
        return self.drop(x + pos.to(x.dtype))


class Block(nn.Module):
    """One pre-LayerNorm Transformer layer: ``x + drop(attn(ln(x)))``, then ``x + drop(ffn(ln(x)))``.

    Attention is causal (``scaled_dot_product_attention(..., is_causal=True)``): the output at
    position ``t`` depends only on inputs at positions ``≤ t``. The FFN is
    ``Linear(d, d_ff) → GELU → Linear(d_ff, d)``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop1 = nn.Dropout(config.dropout)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, config.d_ff)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(config.d_ff, d)
        self.drop2 = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorms to identity, linears ~ N(0, 0.02) with zero bias; the two residual-branch
        output projections are scaled down by ``1/√(2·n_layers)`` (GPT-2's rule)."""
        residual_std = _LINEAR_STD / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.reset_parameters()
            for lin, std in (
                (self.qkv, _LINEAR_STD),
                (self.proj, residual_std),
                (self.ff1, _LINEAR_STD),
                (self.ff2, residual_std),
            ):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d = x.shape
        heads = self.config.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(batch, seq, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(1, 2).reshape(batch, seq, d)
        x = x + self.drop1(self.proj(attn))
        return x + self.drop2(self.ff2(self.act(self.ff1(self.ln2(x)))))


class Head(nn.Module):
    """Last cell: final LayerNorm, then projection to vocabulary logits ``[B, T, vocab]``.

    With tied embeddings ``proj.weight`` is the very ``Parameter`` of the ``Embedding`` cell.
    """

    def __init__(self, config: TransformerConfig, tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.config = config
        self.ln = nn.LayerNorm(config.d_model)
        self.proj = nn.Linear(config.d_model, config.vocab_size)
        if tied_weight is not None:
            if tuple(tied_weight.shape) != (config.vocab_size, config.d_model):
                raise ValueError(
                    f"tied weight has shape {tuple(tied_weight.shape)}, expected "
                    f"({config.vocab_size}, {config.d_model}) = (vocab_size, d_model)."
                )
            self.proj.weight = tied_weight
        self.tied = tied_weight is not None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorm to identity, zero bias; the projection ~ N(0, 0.02) when untied, or, when
        tied, re-drawn with the embedding's distribution N(0, 1/d_model) (so resetting either
        end of a tied pair leaves the shared matrix correctly distributed)."""
        std = self.config.d_model**-0.5 if self.tied else _LINEAR_STD
        with torch.no_grad():
            self.ln.reset_parameters()
            nn.init.normal_(self.proj.weight, std=std)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.ln(x))


_CELLS = (Embedding, Block, Head)


def init_weights(module: nn.Module) -> None:
    """Initialize every model cell (``Embedding``/``Block``/``Head``) inside ``module`` in place.

    Use after ``module.to_empty(device=...)`` on a cell, a slice of the model, or the whole
    model. Cells are visited in registration order, so the result is deterministic given
    ``torch.manual_seed``.
    """
    found = False
    for sub in module.modules():
        if isinstance(sub, _CELLS):
            sub.reset_parameters()
            found = True
    if not found:
        raise TypeError(
            f"init_weights found no Embedding/Block/Head inside {type(module).__name__}; "
            "call it on a TransformerLM, a slice of one, or one of its cells."
        )


class TransformerLM(nn.Sequential):
    """The GPipe Transformer LM: ``Embedding``, ``n_layers`` × ``Block``, ``Head`` in sequence.

    ``model(tokens)`` maps LongTensor ids ``[batch, seq]`` to logits ``[batch, seq, vocab]``;
    the loss (:func:`lm_loss`) stays outside, as in the seed. Children are named ``embed``,
    ``block0`` … ``block{n-1}``, ``head``; ``model[i]`` and ``model[a:b]`` work as for any
    ``nn.Sequential`` (a slice is a plain ``nn.Sequential``).
    """

    def __init__(self, config: TransformerConfig | None = None) -> None:
        config = config if config is not None else TransformerConfig()
        if not isinstance(config, TransformerConfig):
            raise TypeError(
                f"TransformerLM expects a TransformerConfig, got {type(config).__name__}; "
                'build one with TransformerConfig.preset("tiny") or TransformerConfig(...).'
            )
        embed = Embedding(config)
        cells: OrderedDict[str, nn.Module] = OrderedDict(embed=embed)
        for i in range(config.n_layers):
            cells[f"block{i}"] = Block(config)
        cells["head"] = Head(config, embed.weight if config.tie_embeddings else None)
        super().__init__(cells)
        self.config = config

    def __getitem__(self, idx: int | slice) -> nn.Module:  # type: ignore[override]
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def reset_parameters(self) -> None:
        """Re-initialize every cell (see :func:`init_weights`)."""
        init_weights(self)

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Number of distinct parameters (a tied matrix counts once); works on the meta device.

        ``include_embeddings=False`` leaves out the token-embedding matrix (an untied output
        projection is still counted).
        """
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self[0].weight.numel()
        return total


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per token) of ``logits [..., vocab]`` against ``targets [...]``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"lm_loss: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}; "
            "logits must be [batch, seq, vocab] and targets [batch, seq]."
        )
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):  # the softmax in at least float32
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1).long())
