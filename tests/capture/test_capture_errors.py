"""The capture front door on small models: what it keeps (names, ties, output structure,
train/eval) and what it refuses, each with one message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpipe
from gpipe.capture import CaptureError, Sample, capture
from gpipe.capture import graph as graph_mod


class Net(nn.Module):
    """Embedding, a ModuleList of blocks with a mask passed to each, a tied head; returns a
    dict, takes a keyword argument."""

    def __init__(self, n: int = 4, d: int = 8, vocab: int = 16, p: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Dropout(p)) for _ in range(n)
        )
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor | None = None) -> dict:
        x = self.embed(tokens)
        skip = x
        for block in self.blocks:
            x = block(x) + x
            if scale is not None:
                x = x * scale
        return {"logits": self.head(x + skip), "hidden": x}


def _data(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 16, (batch, 5), generator=g), torch.rand(batch, 5, 1, generator=g)


def _pipe(model: nn.Module, sample, **kw) -> gpipe.Pipe:
    kw.setdefault("stages", 2)
    return gpipe.Pipe(model, sample=sample, devices=["cpu"] * kw["stages"], chunks=2, **kw)


def test_the_pipe_returns_the_models_output_structure_and_takes_keywords() -> None:
    torch.manual_seed(0)
    model = Net()
    x, s = _data()
    pipe = _pipe(model, Sample(x, scale=s))
    try:
        with torch.no_grad():
            out = pipe(x, scale=s)
            ref = model(x, scale=s)
        assert isinstance(out, dict) and set(out) == {"logits", "hidden"}
        torch.testing.assert_close(out["logits"], ref["logits"])
        torch.testing.assert_close(out["hidden"], ref["hidden"])
        with pytest.raises(TypeError, match="same positional and keyword arguments"):
            pipe(x)  # the sample had scale=
    finally:
        pipe.close()


def test_state_dict_keys_are_the_models_own_and_load_back() -> None:
    torch.manual_seed(0)
    model = Net()
    x, _ = _data()
    pipe = _pipe(model, x)
    try:
        keys = [k.removeprefix("layers.") for k in pipe.state_dict()]
        assert keys == list(model.state_dict())  # tied names included, in the model's order
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        pipe.load_state_dict({f"layers.{k}": v for k, v in saved.items()})
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, saved[k])
    finally:
        pipe.close()


class _Scaled(nn.Module):
    """A block with submodules and two buffers of its own: one saved, one not."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("shift", torch.arange(4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale + self.shift


def test_a_non_leaf_blocks_buffers_keep_their_persistence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(), nn.Tanh(), _Scaled())
    layers = capture(model, torch.randn(2, 4))
    assert layers.state_dict().keys() == model.state_dict().keys()
    assert "0.scale" in model.state_dict() and "0.shift" not in model.state_dict()
    again = nn.Sequential(_Scaled(), nn.Tanh(), _Scaled())
    layers.load_state_dict(again.state_dict())  # the model's own state dict loads, strict
    x = torch.randn(3, 4)
    torch.testing.assert_close(layers(x), again(x))


def test_tied_weights_stay_one_parameter_across_layers() -> None:
    model = Net()
    layers = capture(model, _data()[0])
    holders = [seg for seg in layers if any(p is model.embed.weight for p in seg.parameters())]
    assert len(holders) == 2  # the embedding's layer and the head's
    assert {n for n, _ in layers.named_children()} >= {"embed", "head"}


def test_split_points_force_the_stage_cuts() -> None:
    model = Net(n=6)
    x, _ = _data()
    layers = capture(model, x, split_points=["blocks.2", "blocks.4:after"])
    names = [n for n, _ in layers.named_children()]
    assert layers.split_balance == [3, 3, len(names) - 6]
    pipe = gpipe.Pipe(layers, devices=["cpu"] * 3, chunks=2)
    try:
        with torch.no_grad():
            torch.testing.assert_close(pipe(x)["logits"], model(x)["logits"])
        assert [p.layers[0] for p in pipe.partitions] == ["embed", "blocks/2", "blocks/5"]
    finally:
        pipe.close()


def test_eval_mode_turns_captured_dropout_off() -> None:
    torch.manual_seed(0)
    model = Net(p=0.5).train()
    x, _ = _data()
    layers = capture(model, x)  # captured in training mode
    layers.eval()
    model.eval()
    out = (x,)
    for i, seg in enumerate(layers):
        out = seg(*out) if i == 0 else seg(out)
    torch.testing.assert_close(out["logits"], model(x)["logits"])


def test_torch_fx_captures_when_export_fails(monkeypatch) -> None:
    torch.manual_seed(0)
    model = Net()
    x, s = _data()

    def broken(*a, **k):
        raise RuntimeError("export is unavailable here")

    monkeypatch.setattr(graph_mod, "_export", broken)
    layers = capture(model, Sample(x, scale=s))
    assert layers.method == "fx"
    pipe = gpipe.Pipe(layers, stages=2, devices=["cpu"] * 2, chunks=2)
    try:
        model.zero_grad()
        loss = pipe.step(Sample(x, scale=s), None, lambda out, _: out["logits"].pow(2).mean())
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x, scale=s)["logits"].pow(2).mean()
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        for a, b in zip(got, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(a, b)
    finally:
        pipe.close()


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # a branch on a value: no graph can hold it
            return self.b(h)
        return h


def test_a_data_dependent_branch_is_one_error_naming_both_tracers_and_the_line() -> None:
    with pytest.raises(CaptureError) as e:
        capture(Branchy(), torch.randn(4, 4))
    msg = str(e.value)
    assert "torch.export failed" in msg and "torch.fx failed" in msg
    assert "branches in Python on a tensor's value" in msg
    assert "test_capture_errors.py" in msg and "h.sum() > 0" in msg
    assert "nn.Sequential" in msg  # the way out


def test_a_split_point_that_names_no_module_lists_the_nearest() -> None:
    with pytest.raises(ValueError, match=r"names no module of Net; nearest names: \['blocks.1'"):
        capture(Net(), _data()[0], split_points=["block.1"])


def test_a_split_point_inside_a_unit_is_refused() -> None:
    with pytest.raises(ValueError, match="inside the unit 'blocks.1'"):
        capture(Net(), _data()[0], split_points=["blocks.1.0"])


def test_a_split_point_at_the_very_start_is_refused() -> None:
    with pytest.raises(ValueError, match="leave a stage empty"):
        capture(Net(), _data()[0], split_points=["embed"])


def test_a_non_sequential_model_without_sample_is_refused() -> None:
    with pytest.raises(TypeError, match="needs an example call: pass sample="):
        gpipe.Pipe(Net(), stages=2, devices=["cpu"] * 2)


def test_keywords_to_a_sequential_pipe_are_refused() -> None:
    pipe = gpipe.Pipe(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), devices=["cpu"])
    try:
        with pytest.raises(TypeError, match=r"keyword arguments \['scale'\]"):
            pipe(torch.randn(2, 2), scale=1.0)
    finally:
        pipe.close()


def test_a_bad_sample_is_refused() -> None:
    with pytest.raises(TypeError, match="sample must be a tensor"):
        capture(Net(), 3)


class FixedLength(nn.Module):
    """Flattens the sequence into a Linear's input: its forward fixes the length at 5."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.head = nn.Linear(5 * 4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).reshape(tokens.shape[0], -1))


def test_a_size_the_forward_fixes_is_refused_by_argument_and_dimension() -> None:
    layers = capture(FixedLength(), torch.zeros(8, 5, dtype=torch.long))
    layers.bind((torch.zeros(3, 5, dtype=torch.long),), {})  # another batch size is fine
    with pytest.raises(ValueError, match=r"positional argument 0 has size 6 in dimension 1.*fixes"):
        layers.bind((torch.zeros(8, 6, dtype=torch.long),), {})
    with pytest.raises(ValueError, match=r"has 3 dimensions .* the sample's had 2"):
        layers.bind((torch.zeros(8, 5, 1, dtype=torch.long),), {})


def test_attention_dropout_captured_in_training_follows_eval() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=8, use_cache=False,
        attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).train()
    x = torch.randint(0, 64, (4, 8))
    layers = capture(model, x)
    assert "AttentionDropout(p=0.5)" in repr(layers)
    layers.eval()
    model.eval()
    out = layers[0](x)
    for seg in list(layers)[1:]:
        out = seg(out)
    torch.testing.assert_close(out.logits, model(x).logits)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).reshape(8, 4))  # the batch size written into the code


def test_a_batch_size_the_forward_fixes_is_named_when_a_micro_batch_differs() -> None:
    pipe = gpipe.Pipe(FixedBatch(), sample=torch.randn(8, 4), devices=["cpu"] * 2, chunks=4)
    try:
        with pytest.raises(RuntimeError) as e, torch.no_grad():
            pipe(torch.randn(16, 4))  # micro-batches of 4 (the cost model meets them first)
        text = f"{e.value} {e.value.__cause__}"
        assert "fixes the batch size at 8" in text and "micro_batch_size=8" in text
    finally:
        pipe.close()
