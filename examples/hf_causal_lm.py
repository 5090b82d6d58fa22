"""Train a tiny Hugging Face causal LM (a Llama) as a pipeline, on the bundled byte corpus.

The model is built from a config (random weights, nothing downloaded), captured on one batch
and cut into layers by ``gpipe.Pipe(model, sample=...)``; the pipe then trains it with the
1F1B schedule over two CPU workers. The loss falls from ln 256 ≈ 5.5 towards the corpus's
unigram entropy within a few dozen steps.

    python examples/hf_causal_lm.py --steps 50

``gpipe train --model examples.hf_causal_lm:tiny_llama`` trains :func:`tiny_llama` the same way
through the trainer (checkpoints, ``--resume``, metrics).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import gpipe
from gpipe.data import get_batch, load_corpus


def build(seq: int, layers: int, width: int):
    """A Llama-family causal LM over bytes (vocabulary 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=seq, use_cache=False, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_llama(seq_len: int = 64):
    """For ``gpipe train --model examples.hf_causal_lm:tiny_llama``: a 2-layer, 32-wide Llama
    (the trainer captures it on one micro-batch of ``seq_len`` bytes)."""
    return build(seq_len, layers=2, width=32)


def loss_fn(out, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-bytes", type=int, default=2_000_000)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    corpus = load_corpus(max_bytes=args.max_bytes)
    model = build(args.seq, args.layers, args.width)
    x, _ = get_batch(corpus.train, args.batch, args.seq, seed=0, step=0)
    pipe = gpipe.Pipe(
        model, sample=x, stages=args.stages, devices=["cpu"] * args.stages,
        chunks=args.chunks, schedule="1f1b",
    )  # fmt: skip
    opt = torch.optim.AdamW(pipe.parameters(), lr=args.lr)
    print(f"{corpus.description}; {sum(p.numel() for p in model.parameters()):,} parameters")
    loss = math.nan
    try:
        for step in range(args.steps):
            x, y = get_batch(corpus.train, args.batch, args.seq, seed=0, step=step)
            loss = pipe.step(x, y, loss_fn).item()
            opt.step()
            opt.zero_grad()
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss:.3f}")
        for part in pipe.partitions:
            print(part)
    finally:
        pipe.close()
    return loss


if __name__ == "__main__":
    main()
