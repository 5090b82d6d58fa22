"""Models for the capture tests, each built from a tiny config with random weights.

Every builder returns ``(model, inputs, targets, loss_fn)``: ``model(*inputs)`` is the plain
forward the pipe must equal, ``loss_fn(output, targets)`` a scalar loss of that output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpipe.models.transformer import Block, Embedding, Head, TransformerConfig

BATCH = 8
SEQ = 8
VOCAB = 64


class LoopLM(nn.Module):
    """The library's Transformer cells written the usual way: a forward that loops over a
    ``ModuleList`` and passes a padding mask to every step; embedding and head tied."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.head = Head(config, tied_weight=self.embed.weight)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        if keep is None:  # a branch on an argument's presence, not on a tensor's value
            keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        mask = keep.unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x) * mask + x * (1 - mask)
        return self.head(x)


def lm_loss(out, targets: torch.Tensor) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loop_lm(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=6,
        max_seq_len=SEQ,
        dropout=dropout,
    )
    model = LoopLM(cfg).to(dtype)
    x, y = _tokens(1)
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[:, -2:] = False
    return model, (x, keep), y, lm_loss


def gpt2(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=4,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=SEQ,
        use_cache=False,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    x, y = _tokens(2)
    return model, (x,), y, lm_loss


def llama(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        use_cache=False,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    x, y = _tokens(3)
    return model, (x,), y, lm_loss


def bert(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    model = BertForSequenceClassification(cfg).to(dtype)
    x, _ = _tokens(4)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[:, -3:] = 0
    y = torch.randint(0, 3, (BATCH,), generator=torch.Generator().manual_seed(5))
    return model, (x, mask), y, cls_loss


def vit(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(cfg).to(dtype)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (BATCH,), generator=g)
    return model, (x,), y, cls_loss


def cls_loss(out, targets: torch.Tensor) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out["logits"]
    return F.cross_entropy(logits, targets)


BUILDERS = {"loop_lm": loop_lm, "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}
