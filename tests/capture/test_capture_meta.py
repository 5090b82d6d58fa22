"""A model built on the meta device is captured and cut without allocating, and its layers
materialize (as DistributedPipe does per rank) into the model's own modules, ties kept."""

from __future__ import annotations

import torch

from capture_models import SEQ, VOCAB, LoopLM
from gpipe.capture import capture
from gpipe.core.materialize import materialize
from gpipe.models.transformer import TransformerConfig


def _meta_model() -> tuple[LoopLM, tuple]:
    cfg = TransformerConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_layers=3, max_seq_len=SEQ, dropout=0
    )
    with torch.device("meta"):
        model = LoopLM(cfg)
        tokens = torch.zeros(4, SEQ, dtype=torch.long)
        keep = torch.ones(4, SEQ, dtype=torch.bool)
    return model, (tokens, keep)


def test_capture_on_meta_allocates_nothing() -> None:
    model, sample = _meta_model()
    layers = capture(model, sample)
    assert len(layers) == 5  # embed, 3 blocks, head
    assert all(p.is_meta for p in layers.parameters())
    assert all(p.is_meta for p in model.parameters())


def test_meta_layers_materialize_into_the_models_own_modules_with_ties_kept() -> None:
    model, sample = _meta_model()
    layers = capture(model, sample)
    materialize(layers, "cpu", seed=3)
    assert not any(p.is_meta for p in model.parameters())  # the model's modules, materialized
    assert model.head.proj.weight is model.embed.tok.weight  # still one parameter
    x = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(4, SEQ, dtype=torch.bool)
    out = layers[0](x, keep)
    for seg in list(layers)[1:]:
        out = seg(out)
    torch.testing.assert_close(out, model(x, keep))
    again, sample2 = _meta_model()
    layers2 = capture(again, sample2)
    materialize(layers2, "cpu", seed=3)  # keyed by (seed, layer index): the same values
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
