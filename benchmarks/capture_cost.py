"""What capturing a model costs, and what a batch of a new sequence length costs the first time.

For a few Hugging Face architectures built from shrunk default configs (random weights): the
time of ``gpipe.capture.capture`` with its self-check and without (``check=False``), the
time of one ``torch.export`` of the model (the capture makes one per mode: the model's own,
train, eval), what a captured pipe does before every call (``prepare``: check the model still
holds the captured objects, pick the graph of its modes; then ``bind``), then ``Pipe.step`` times: the sample's length warm, the first step at a new
length, and that length again. Medians of ``--repeats``.

    python benchmarks/capture_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import gpipe
from gpipe.capture import capture

VOCAB = 128


def models() -> dict:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    return {
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                n_layer=4,
                n_embd=64,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=128,
                use_cache=False,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "bert": lambda: BertForMaskedLM(
            BertConfig(
                num_hidden_layers=4,
                hidden_size=64,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=VOCAB,
            )
        ),
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=4,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=4,
                intermediate_size=128,
                vocab_size=VOCAB,
                use_cache=False,
            )
        ),
    }


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def loss_fn(out, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def one_round(build, args: argparse.Namespace) -> dict[str, float]:
    """One model built and captured, then stepped at the sample's length and a new one."""
    torch.manual_seed(0)
    model = build()
    x = torch.randint(0, VOCAB, (args.rows, args.length))
    x2 = torch.randint(0, VOCAB, (args.rows, args.new_length))
    out = {
        "export": timed(lambda: torch.export.export(model, (x,), strict=False)),
        "capture": timed(lambda: capture(model, x, check=False)),
    }
    t = time.perf_counter()
    layers = capture(model, x)
    out["check"] = time.perf_counter() - t
    calls = 200  # what a captured pipe does before every call: check the model, pick the graph
    t = time.perf_counter()
    for _ in range(calls):
        layers.prepare()
        layers.bind((x,), {})
    out["per_call"] = (time.perf_counter() - t) / calls
    with gpipe.Pipe(layers, stages=2, chunks=2) as pipe:
        pipe.step(x, x, loss_fn)
        out["warm"] = timed(lambda: pipe.step(x, x, loss_fn))
        out["first"] = timed(lambda: pipe.step(x2, x2, loss_fn))
        out["again"] = timed(lambda: pipe.step(x2, x2, loss_fn))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--new-length", type=int, default=48)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
        f"{args.repeats}; seconds"
    )
    print(
        f"{'model':8} {'export':>8} {'capture':>8} {'+check':>8} "
        f"{'step@L':>8} {'1st@L2':>8} {'2nd@L2':>8} {'call us':>8}"
    )
    for name, build in models().items():
        rows: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for k, v in one_round(build, args).items():
                rows.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(
            f"{name:8} {med['export']:8.2f} {med['capture']:8.2f} {med['check']:8.2f} "
            f"{med['warm']:8.3f} {med['first']:8.3f} {med['again']:8.3f} "
            f"{1e6 * med['per_call']:8.0f}"
        )


if __name__ == "__main__":
    main()
