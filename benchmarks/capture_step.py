"""Step time of a captured-and-cut GPT-2 against the same model written by hand as an
``nn.Sequential`` (embedding, blocks, final norm and head as its children), in one run.

Both pipes hold the very same modules and parameters, use the same K, M, schedule and
re-materialization mode, and their steps alternate so machine noise hits both alike.
Reported: the median step time of each over ``--steps`` steps (after warm-up) and their
ratio. With dropout off, the two losses are checked equal first.

    python benchmarks/capture_step.py          # --quick for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gpipe


class _Embed(nn.Module):
    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = t.wte, t.wpe, t.drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(pos))


def _by_hand(model: nn.Module) -> nn.Sequential:
    t = model.transformer
    return nn.Sequential(_Embed(t), *t.h, t.ln_f, model.lm_head)


def _loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _gpt2(dropout: float, layers: int, width: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=256, n_positions=seq,
        use_cache=False, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else args.steps
    k = args.stages
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def pipes(model: nn.Module) -> tuple[gpipe.Pipe, gpipe.Pipe]:
        common = dict(stages=k, devices=["cpu"] * k, chunks=args.chunks, schedule=args.schedule)
        return (
            gpipe.Pipe(model, sample=x, **common),
            gpipe.Pipe(_by_hand(model), **common),
        )

    model = _gpt2(0.0, args.layers, args.width, args.seq)
    captured, by_hand = pipes(model)
    a = captured.step(x, y, _loss).item()
    b = by_hand.step(x, y, _loss).item()
    print(f"dropout off: loss captured {a:.6f}, by hand {b:.6f}, |diff| {abs(a - b):.2e}")
    captured.close()
    by_hand.close()

    model = _gpt2(0.1, args.layers, args.width, args.seq)
    captured, by_hand = pipes(model)
    times: dict[str, list[float]] = {"captured": [], "by hand": []}
    for i in range(steps + 2):
        for name, pipe in (("captured", captured), ("by hand", by_hand)):
            t = time.perf_counter()
            pipe.step(x, y, _loss)
            model.zero_grad()
            if i >= 2:  # warm-up: balance, first runs under the full random-stream mode
                times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        f"GPT-2 {args.layers}x{args.width}, batch {args.batch}x{args.seq}, K={k}, "
        f"M={args.chunks}, {args.schedule}, dropout 0.1, {steps} steps each"
    )
    print(f"  captured ({len(captured)} layers): median step {med['captured'] * 1e3:.1f} ms")
    print(f"  by hand  ({len(by_hand)} layers): median step {med['by hand'] * 1e3:.1f} ms")
    print(f"  ratio captured / by hand: {med['captured'] / med['by hand']:.3f}")
    captured.close()
    by_hand.close()


if __name__ == "__main__":
    main()
