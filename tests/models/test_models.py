"""Tests for gpipe.models: the flat Transformer LM, its config, init and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpipe.models import TransformerConfig, TransformerLM, init_weights, lm_loss
from gpipe.models.transformer import Block, Embedding, Head


def tiny(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig.preset("tiny", **overrides))


def expected_params(c: TransformerConfig) -> int:
    d, f, v = c.d_model, c.d_ff, c.vocab_size
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    head = 2 * d + v + (0 if c.tie_embeddings else v * d)
    return v * d + c.n_layers * block + head


def test_output_shape_and_children():
    model = tiny()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    assert model(tokens).shape == (3, 17, cfg.vocab_size)
    assert len(model) == cfg.n_layers + 2
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], Embedding) and isinstance(model[-1], Head)
    assert all(isinstance(model[i], Block) for i in range(1, cfg.n_layers + 1))


def test_every_child_maps_one_tensor_and_slices_compose():
    model = tiny().eval()
    tokens = torch.randint(0, 256, (2, 9))
    x = tokens
    for child in model:
        x = child(x)
        assert isinstance(x, torch.Tensor)
    full = model(tokens)
    torch.testing.assert_close(x, full)
    front, back = model[:2], model[2:]
    assert type(front) is nn.Sequential and len(front) + len(back) == len(model)
    torch.testing.assert_close(back(front(tokens)), full)


def test_causality():
    model = tiny().eval()
    tokens = torch.randint(0, 256, (2, 20))
    t = 11
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def test_tied_and_untied_weights():
    untied = tiny()
    assert untied[-1].proj.weight is not untied[0].tok.weight
    tied = tiny(tie_embeddings=True)
    assert tied[-1].proj.weight is tied[0].tok.weight
    v, d = tied.config.vocab_size, tied.config.d_model
    assert untied.num_parameters() - tied.num_parameters() == v * d
    # The shared matrix's gradient is the sum of its two uses': compare with an untied copy.
    tokens, targets = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    tied.eval()  # no dropout, so both models compute the same function
    lm_loss(tied(tokens), targets).backward()
    split = tiny(tie_embeddings=False).eval()
    split.load_state_dict(tied.state_dict())
    lm_loss(split(tokens), targets).backward()
    both = split[0].tok.weight.grad + split[-1].proj.weight.grad
    torch.testing.assert_close(tied[0].tok.weight.grad, both, rtol=1e-5, atol=1e-7)
    assert split[-1].proj.weight.grad.abs().sum() > 0 and split[0].tok.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "small", "1b-words"])
def test_parameter_count_matches_config(name):
    cfg = TransformerConfig.preset(name)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    assert model.num_parameters() == expected_params(cfg)


def test_meta_construction_of_1b_words_allocates_nothing():
    cfg = TransformerConfig.preset("1b-words")
    with torch.device("meta"):
        model = TransformerLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model) == 34
    # 32 layers of 12·d² + the two 32000×2048 matrices: ≈ 1.74 billion parameters.
    assert 1.70e9 < model.num_parameters() < 1.78e9
    logits = model(torch.zeros(2, 1024, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 1024, 32000) and logits.is_meta


def test_materialize_from_meta_then_init():
    cfg = TransformerConfig.preset("tiny", dropout=0.0)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    init_weights(model)
    tokens = torch.randint(0, 256, (2, 12))
    out = model(tokens)
    # Initialized values, not leftovers: LayerNorm weights are ones, biases zeros.
    assert torch.equal(model[1].ln1.weight, torch.ones(cfg.d_model))
    assert torch.equal(model[1].qkv.bias, torch.zeros(3 * cfg.d_model))
    # Same seed → same init, hence the same output (leftover memory would differ).
    again = TransformerLM(cfg)
    torch.manual_seed(1)
    init_weights(again)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(out, again(tokens))


def test_materialize_one_cell_from_meta():
    cfg = TransformerConfig.preset("tiny")
    with torch.device("meta"):
        model = TransformerLM(cfg)
    block = model[1].to_empty(device="cpu")
    torch.manual_seed(2)
    init_weights(block)
    assert not any(p.is_meta for p in block.parameters())
    # every tensor initialized as documented: LayerNorms identity, linears N(0, 0.02) (the
    # residual outputs scaled by 1/sqrt(2 n_layers)), biases zero
    for ln in (block.ln1, block.ln2):
        assert torch.equal(ln.weight, torch.ones(cfg.d_model))
        assert torch.equal(ln.bias, torch.zeros(cfg.d_model))
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    for lin, std in (
        (block.qkv, 0.02),
        (block.proj, residual),
        (block.ff1, 0.02),
        (block.ff2, residual),
    ):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert abs(lin.weight.std().item() - std) < 0.2 * std, (lin, lin.weight.std())
        assert abs(lin.weight.mean().item()) < 0.2 * std
    with pytest.raises(TypeError, match="no Embedding/Block/Head"):
        init_weights(nn.Linear(2, 2))


def test_construction_is_deterministic_given_seed():
    a, b = tiny(), tiny()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    torch.manual_seed(1)
    c = TransformerLM(a.config)
    assert not torch.equal(a[1].qkv.weight, c[1].qkv.weight)


def test_dropout_is_plain_modules_and_replayable():
    model = tiny(dropout=0.5).train()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 + 2 * model.config.n_layers
    tokens = torch.randint(0, 256, (2, 8))
    torch.manual_seed(7)
    a = model(tokens)
    torch.manual_seed(7)
    b = model(tokens)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model.eval()(tokens))


def test_adam_reduces_loss_on_a_repeated_batch():
    model = tiny(dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 17), generator=gen)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(256)) < 0.5
    assert losses[-1] < 0.7 * losses[0]


def test_lm_loss_matches_cross_entropy_and_checks_shapes():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy(logits.reshape(10, 11), targets.reshape(10))
    torch.testing.assert_close(lm_loss(logits, targets), expected)
    torch.testing.assert_close(
        lm_loss(torch.zeros(1, 3, 8), targets[:1, :3] % 8), torch.tensor(math.log(8))
    )
    with pytest.raises(ValueError, match="do not match targets"):
        lm_loss(logits, targets[:, :4])


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerLM({"d_model": 32})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible"),
        ({"n_layers": 0}, "positive int"),
        ({"vocab_size": 2.5}, "positive int"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**fields)


def test_presets():
    tiny_cfg = TransformerConfig.preset("tiny")
    assert (tiny_cfg.d_model, tiny_cfg.n_heads, tiny_cfg.n_layers) == (32, 2, 2)
    big = TransformerConfig.preset("1b-words")
    assert (big.vocab_size, big.d_ff, big.n_layers, big.tie_embeddings) == (32000, 8192, 32, False)
    assert TransformerConfig.preset("small", n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="unknown TransformerConfig preset"):
        TransformerConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.preset("tiny", width=3)
