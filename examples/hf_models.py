"""Hugging Face models for ``gpipe plan --model examples.hf_models:<function>``.

Each function builds a model from a config (random weights, nothing downloaded; under
``gpipe plan`` on the meta device, so nothing is allocated either) and returns it with an
example input of one micro-batch; the pipe captures the model on that input and cuts it.
"""

from __future__ import annotations

import torch


def llama_1b(batch: int = 2, seq: int = 512):
    """A 1.1-billion-parameter Llama-family causal LM (TinyLlama's shape) and its input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    return model, torch.zeros(batch, seq, dtype=torch.long)


def gpt2_tiny(batch: int = 4, seq: int = 64):
    """A 4-layer GPT-2 of width 64 and its input."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4,
        n_embd=64,
        n_head=4,
        vocab_size=256,
        n_positions=seq,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg), torch.zeros(batch, seq, dtype=torch.long)
