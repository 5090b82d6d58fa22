"""Unusual-but-legal calls and bad inputs, round 2: capture, the planner, reductions, the
trainer's flags and config files, and ``DistributedPipe``'s construction options.

Each row is one case of docs/reliability.md: a call that must raise (the exception type and a
regex its message must match, raised before any state changes), a ``gpipe`` command line that
must end in one ``gpipe: error:`` line and exit code 2, or a call whose result must equal the
plain model's. The transformers cases at the top are the captures that used to fail with
another layer's message, or only after the backward had filled every ``.grad``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gpipe
from gpipe.capture import CaptureError, Sample, capture
from gpipe.cli.main import main
from gpipe.planner.autoplan import autoplan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def gpt2(**config: Any) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **config,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# ---------------------------------------------------------------- transformers models


def test_a_reentrant_gradient_checkpoint_is_refused_at_capture_naming_the_way_out() -> None:
    """It used to capture, then fail at the step: the body ran under no_grad in the graph."""
    model = gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(CaptureError, match=r"computes output\['logits'\] without gradients") as e:
        gpipe.Pipe(model, sample=IDS, devices=["cpu"] * 2)
    for way_out in ("use_reentrant=True", "gradient_checkpointing_disable()", "remat='always'"):
        assert way_out in str(e.value)
    assert all(p.grad is None for p in model.parameters())


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 4), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(self.a, torch.tanh(x), use_reentrant=self.reentrant))


def test_a_reentrant_checkpoint_in_any_module_is_refused() -> None:
    with pytest.raises(CaptureError, match=r"ran under torch.no_grad\(\).*use_reentrant=False"):
        gpipe.Pipe(Checkpointed(True), sample=X, devices=["cpu"] * 2)


def test_a_non_reentrant_checkpoint_trains_as_the_plain_model() -> None:
    torch.manual_seed(0)
    model, x, y = Checkpointed(False).double(), X.double(), torch.randn(8, 4).double()
    F.mse_loss(model(x), y).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    pipe = gpipe.Pipe(model, sample=x, devices=["cpu"] * 2, chunks=2, remat="always")
    pipe.step(x, y, F.mse_loss)
    assert_same_grads(grads(model), want)


def test_a_non_reentrant_gradient_checkpoint_trains_as_the_plain_model() -> None:
    model = gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm_loss(model(IDS).logits, IDS).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    pipe = gpipe.Pipe(model, sample=IDS, devices=["cpu"] * 2, chunks=2)
    pipe.step(IDS, IDS, lambda out, y: lm_loss(out.logits, y))
    assert_same_grads(grads(model), want)


def test_hf_keywords_in_the_sample_capture_and_train_as_the_plain_model() -> None:
    """``output_hidden_states=True`` and ``return_dict=False`` go into the forward's
    ``**kwargs``: export used to fail with "Must provide a tree_name"."""
    model = gpt2()
    call = Sample(IDS, output_hidden_states=True, return_dict=False)
    out = model(IDS, output_hidden_states=True, return_dict=False)
    lm_loss(out[0], IDS).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    pipe = gpipe.Pipe(model, sample=call, devices=["cpu"] * 2, chunks=2)
    got = pipe(IDS, output_hidden_states=True, return_dict=False)
    assert isinstance(got, tuple) and len(got[1]) == len(out[1])
    torch.testing.assert_close(got[0], out[0], rtol=1e-10, atol=1e-10)
    pipe.step(call, IDS, lambda o, y: lm_loss(o[0], y))
    assert_same_grads(grads(model), want)


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.b(self.a(x) * kwargs.get("scale", 1.0))


def test_a_forward_with_kwargs_takes_an_extra_keyword_as_the_plain_model() -> None:
    model, scale = Keywords().double(), torch.rand(8, 4, dtype=torch.float64) + 0.5
    x = X.double()
    want = model(x, scale=scale)
    pipe = gpipe.Pipe(model, sample=Sample(x, scale=scale), devices=["cpu"] * 2, chunks=2)
    torch.testing.assert_close(pipe(x, scale=2 * scale), model(x, scale=2 * scale))
    torch.testing.assert_close(pipe(x, scale=scale), want)
    with pytest.raises(TypeError, match=r"keyword\(s\) \['scale'\], but got .* keyword\(s\) \[\]"):
        pipe(x)


def test_llama_left_at_use_cache_names_use_cache_false() -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=True,
    )
    with pytest.raises(CaptureError, match=r"returns a key/value cache.*use_cache=False"):
        gpipe.Pipe(transformers.LlamaForCausalLM(cfg), sample=IDS, devices=["cpu"] * 2)


def test_labels_in_the_call_are_refused_before_any_gradient() -> None:
    """The model's own loss has no batch dimension: refused at the last stage's forward of
    micro-batch 0, before any backward (it used to fail after every ``.grad`` was filled)."""
    model = gpt2()
    call = Sample(IDS, labels=IDS)
    pipe = gpipe.Pipe(model, sample=call, devices=["cpu"] * 2, chunks=2, schedule="1f1b")
    with pytest.raises(gpipe.StageError, match=r"output\['loss'\] is a 0-dim tensor.*labels="):
        pipe.step(call, IDS, lambda out, y: out.loss)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- calls that must raise


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.h:
            x = torch.tanh(layer(x))
        return x if mask is None else x * mask


class NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> None:
        self.a(x)


def mlp(n: int = 4) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])


def net_pipe(**kw: Any) -> gpipe.Pipe:
    return gpipe.Pipe(Net(), devices=["cpu"] * 2, **kw)


def plan(**kw: Any) -> Callable[[], Any]:
    return lambda: autoplan(mlp(), X, **kw)


def step(reduction: Any, targets: Any = None, loss_fn: Any = F.cross_entropy) -> Callable:
    def run() -> Any:
        pipe = gpipe.Pipe(mlp(), devices=["cpu"] * 2, chunks=2)
        y = torch.randint(0, 4, (8,)) if targets is None else targets
        return pipe.step(X, y, loss_fn, reduction=reduction)

    return run


def tweak(pipe_call: Callable[[gpipe.Pipe], Any], **kw: Any) -> Callable[[], Any]:
    return lambda: pipe_call(net_pipe(**kw))


ONES = torch.ones(8, 4)

# (id, call, exception type, message regex)
RAISES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # capture
    (
        "cap-model-function",
        lambda: capture(lambda x: x, X),
        TypeError,
        r"capture needs an nn.Module, got function",
    ),
    (
        "cap-sample-int",
        lambda: capture(Net(), 5),
        TypeError,
        r"sample must be a tensor, .* got int",
    ),
    (
        "cap-sample-str",
        lambda: capture(Net(), "x"),
        TypeError,
        r"sample must be a tensor, .* got str",
    ),
    (
        "cap-sample-set",
        lambda: capture(Net(), {X}),
        TypeError,
        r"sample must be a tensor, .* got set",
    ),
    (
        "cap-sample-empty-tuple",
        lambda: capture(Net(), ()),
        TypeError,
        r"sample= does not fit Net.forward\(x, mask=None\): missing a required argument: 'x'",
    ),
    (
        "cap-sample-too-many-args",
        lambda: capture(Net(), (X, X, X)),
        TypeError,
        r"sample= does not fit Net.forward.*too many positional arguments",
    ),
    (
        "cap-sample-misspelt-keyword",
        lambda: capture(Net(), Sample(X, maks=X)),
        TypeError,
        r"does not fit Net.forward.*unexpected keyword argument 'maks'",
    ),
    (
        "cap-sample-dict-int-keys",
        lambda: capture(Net(), {0: X}),
        TypeError,
        r"sample= is a dict, so its keys are the forward's keyword names, but it holds the key 0",
    ),
    (
        "cap-sample-wrong-width",
        lambda: capture(Net(), torch.randn(8, 5)),
        CaptureError,
        r"Net raises on sample= itself \(RuntimeError: mat1 and mat2 shapes",
    ),
    (
        "cap-sample-wrong-dtype",
        lambda: capture(Net().double(), X),
        CaptureError,
        r"Net raises on sample= itself .*dtype.*give sample= inputs the model accepts",
    ),
    (
        "cap-sample-int-tensor",
        lambda: capture(Net(), ONES.long()),
        CaptureError,
        r"Net raises on sample= itself .*Long and Float",
    ),
    (
        "cap-sample-on-meta-model-on-cpu",
        lambda: capture(Net(), X.to("meta")),
        CaptureError,
        r"Net raises on sample= itself .*meta",
    ),
    (
        "cap-sample-empty-batch",
        lambda: capture(Net(), X[:0]),
        ValueError,
        r"sample= has 0 rows along batch_dim=0; capture on a sample of at least one row",
    ),
    ("pipe-empty-sample", lambda: net_pipe(sample=X[:0]), ValueError, r"sample= has 0 rows"),
    (
        "cap-sample-0dim",
        lambda: capture(NoParameters(), torch.tensor(1.0)),
        ValueError,
        r"sample= is not one batch: .* is a 0-dim tensor",
    ),
    (
        "cap-sample-inputs-of-two-batch-sizes",
        lambda: capture(Net(), Sample(X, mask=torch.ones(5, 4))),
        ValueError,
        r"sample= is not one batch: tensors differ in size along batch_dim=0 \(size 5: .*\['mask'\]",
    ),
    (
        "cap-batch-dim-out-of-range",
        lambda: capture(Net(), X, batch_dim=5),
        ValueError,
        r"batch_dim=5 is out of range \(use a dimension in \[-2, 1\]\)",
    ),
    (
        "cap-batch-dim-bool",
        lambda: capture(Net(), X, batch_dim=True),
        TypeError,
        r"batch_dim must be an int \(a dimension index\), got bool True",
    ),
    (
        "cap-method-jit",
        lambda: capture(Net(), X, method="jit"),
        ValueError,
        r"method must be 'auto', 'export' or 'fx', got 'jit'",
    ),
    (
        "cap-split-points-int",
        lambda: capture(Net(), X, split_points=5),
        TypeError,
        r"split_points must be a module path or a list of them \(e.g. \['h.2'\]\), got int 5",
    ),
    (
        "cap-split-point-after-last",
        lambda: capture(Net(), X, split_points=["h.3:after"]),
        ValueError,
        r"split point 'h.3':after is after the last layer",
    ),
    (
        "cap-split-point-middle",
        lambda: capture(Net(), X, split_points=["h.1:middle"]),
        ValueError,
        r"say '<module>:before' or '<module>:after', not 'middle'",
    ),
    (
        "pipe-split-points-and-balance",
        lambda: net_pipe(sample=X, split_points=["h.2"], balance=[1, 3]),
        ValueError,
        r"split_points cut the model into stages of \[2, 2\] layers, and balance=\[1, 3\] cuts it too; give one of them",
    ),
    (
        "pipe-one-unit-two-stages",
        lambda: gpipe.Pipe(NoParameters(), sample=X, devices=["cpu"] * 2),
        ValueError,
        r"cannot cut 1 layers into 2 stages; use at most 1 stages",
    ),
    (
        "pipe-stages-str",
        lambda: net_pipe(sample=X, stages="2"),
        TypeError,
        r"stages must be an int >= 1, got str '2'",
    ),
    (
        "pipe-call-none-then-tensor",
        lambda: gpipe.Pipe(Net(), sample=Sample(X, mask=None), devices=["cpu"] * 2)(X, mask=ONES),
        ValueError,
        r"keyword argument 'mask' is a tensor of shape \(8, 4\) \(torch.float32\), but the model was captured with None there",
    ),
    (
        "pipe-call-keyword-as-positional",
        lambda: gpipe.Pipe(Net(), sample=Sample(X, mask=ONES), devices=["cpu"] * 2)(X, ONES),
        TypeError,
        r"captured for calls shaped like its sample, 1 positional argument\(s\) and keyword\(s\) \['mask'\], but got 2 positional",
    ),
    (
        "pipe-call-list-for-tensor",
        tweak(lambda p: p([X]), sample=X),
        TypeError,
        r"positional argument 0 is a list of 1 where the sample had one value \(a tensor\)",
    ),
    (
        "pipe-call-other-dtype",
        tweak(lambda p: p(X.double()), sample=X),
        gpipe.StageError,
        r"stage 0 .* micro-batch 0: RuntimeError: mat1 and mat2 must have the same dtype",
    ),
    # the planner
    ("plan-devices-zero", plan(devices=0), ValueError, r"devices must be >= 1, got 0"),
    ("plan-devices-negative", plan(devices=-1), ValueError, r"devices must be >= 1, got -1"),
    (
        "plan-devices-bool",
        plan(devices=True),
        TypeError,
        r"devices must be a count K or a list of K devices, got True",
    ),
    (
        "plan-devices-float",
        plan(devices=2.0),
        TypeError,
        r"devices must be a count K or a list of K devices, got 2.0",
    ),
    (
        "plan-devices-empty-list",
        plan(devices=[]),
        ValueError,
        r"devices is empty; give a count K or K devices",
    ),
    (
        "plan-memory-negative",
        plan(memory_limit=-1),
        ValueError,
        r"a memory size must be positive, got -1",
    ),
    (
        "plan-memory-zero",
        plan(memory_limit=0),
        ValueError,
        r"a memory size must be positive, got 0",
    ),
    (
        "plan-memory-garbage",
        plan(memory_limit="lots"),
        ValueError,
        r"cannot read the memory size 'lots'; write a number of bytes or one with a unit",
    ),
    (
        "plan-memory-bool",
        plan(memory_limit=True),
        TypeError,
        r"a memory size must be bytes or a string like '8GiB', got True",
    ),
    ("plan-schedules-empty", plan(schedules=[]), ValueError, r"schedules is empty; give some of"),
    (
        "plan-schedules-string",
        plan(schedules="gpipe"),
        TypeError,
        r"schedules must be a list of names, got the string 'gpipe'; use \['gpipe'\]",
    ),
    (
        "plan-max-chunks-bool",
        plan(max_chunks=True),
        TypeError,
        r"max_chunks must be an int >= 1, got bool True",
    ),
    (
        "plan-max-chunks-float",
        plan(max_chunks=2.5),
        TypeError,
        r"max_chunks must be an int >= 1, got float 2.5",
    ),
    (
        "plan-batch-size-bool",
        plan(batch_size=True),
        TypeError,
        r"batch_size must be an int >= 1, got bool True",
    ),
    (
        "plan-batch-size-float",
        plan(batch_size=8.0),
        TypeError,
        r"batch_size must be an int >= 1, got float 8.0",
    ),
    (
        "plan-headroom-negative",
        plan(headroom=-0.1),
        ValueError,
        r"headroom must be a fraction in \[0, 1\), got -0.1",
    ),
    (
        "plan-headroom-nan",
        plan(headroom=float("nan")),
        ValueError,
        r"headroom must be a fraction in \[0, 1\), got nan",
    ),
    ("plan-remat-modes-empty", plan(remat_modes=[]), ValueError, r"remat_modes is empty"),
    (
        "plan-remat-modes-string",
        plan(remat_modes="always"),
        TypeError,
        r"remat_modes must be a list of names, got the string 'always'",
    ),
    ("plan-chunks-zero", plan(chunks=[0]), ValueError, r"chunks\[...\] must be >= 1, got 0"),
    (
        "plan-chunks-int",
        plan(chunks=2),
        TypeError,
        r"chunks must be a non-empty list of micro-batch counts, got 2",
    ),
    (
        "plan-chunks-not-dividing",
        plan(chunks=[3]),
        ValueError,
        r"chunks \[3\] do not divide the batch of 8 rows",
    ),
    (
        "plan-virtual-stages-zero",
        plan(virtual_stages=[0]),
        ValueError,
        r"virtual_stages\[...\] must be >= 1, got 0",
    ),
    (
        "plan-virtual-stages-int",
        plan(virtual_stages=2),
        TypeError,
        r"virtual_stages must be a list of virtual-stage counts to try \(e.g. \[2, 3\]\), got 2",
    ),
    (
        "plan-optimizer-unknown",
        plan(optimizer="adamw2"),
        ValueError,
        r"unknown optimizer 'adamw2'; choose one of",
    ),
    (
        "plan-optimizer-negative",
        plan(optimizer=-1),
        ValueError,
        r"optimizer slot count must be >= 0, got -1",
    ),
    ("plan-pinned-negative", plan(pinned=-1), ValueError, r"pinned must be >= 0, got -1"),
    (
        "plan-pinned-every-layer",
        plan(pinned=4),
        ValueError,
        r"pinned=4 leaves 0 layers for the other 1 stages; pin at most 3",
    ),
    (
        "plan-flops-zero",
        plan(flops_per_second=0),
        ValueError,
        r"flops_per_second must be a finite number > 0, got 0",
    ),
    (
        "plan-flops-nan",
        plan(flops_per_second=float("nan")),
        ValueError,
        r"flops_per_second must be a finite number > 0, got nan",
    ),
    (
        "plan-action-overhead-negative",
        plan(action_overhead=-1.0),
        ValueError,
        r"action_overhead must be a finite number >= 0, got -1.0",
    ),
    (
        "plan-split-extra-negative",
        plan(split_extra=-0.5),
        ValueError,
        r"split_extra must be a finite number >= 0, got -0.5",
    ),
    (
        "plan-repeats-zero",
        plan(repeats=0, measure=True),
        ValueError,
        r"repeats must be >= 1, got 0",
    ),
    (
        "plan-model-int",
        lambda: autoplan(5, X),
        TypeError,
        r"autoplan needs an nn.Sequential \(or a list of modules\), got int",
    ),
    (
        "plan-model-empty",
        lambda: autoplan(nn.Sequential(), X),
        ValueError,
        r"autoplan needs at least one layer",
    ),
    (
        "plan-sample-wrong-width",
        lambda: autoplan(mlp(), torch.randn(8, 5)),
        RuntimeError,
        r"layer 0 \('0', Linear\) failed on fake tensors with inputs \[input\[0\]: \(8, 5\)",
    ),
    (
        "auto-tune-negative",
        lambda: gpipe.Auto(tune=-1),
        ValueError,
        r"Auto: tune must be an integer >= 0, got -1",
    ),
    (
        "auto-tune-bool",
        lambda: gpipe.Auto(tune=True),
        ValueError,
        r"Auto: tune must be an integer >= 0, got True",
    ),
    (
        "auto-tune-float",
        lambda: gpipe.Auto(tune=1.5),
        ValueError,
        r"Auto: tune must be an integer >= 0, got 1.5",
    ),
    (
        "auto-memory-zero",
        lambda: gpipe.Auto(memory_limit=0),
        ValueError,
        r"a memory size must be positive, got 0",
    ),
    (
        "auto-schedules-string",
        lambda: gpipe.Auto(schedules="1f1b"),
        TypeError,
        r"schedules must be a list of names, got the string '1f1b'",
    ),
    (
        "auto-repeats-zero",
        lambda: gpipe.Auto(repeats=0),
        ValueError,
        r"repeats must be >= 1, got 0",
    ),
    (
        "auto-flops-negative",
        lambda: gpipe.Auto(flops_per_second=-1.0),
        ValueError,
        r"flops_per_second must be a finite number > 0, got -1.0",
    ),
    # reductions
    (
        "reduction-none",
        step(None),
        ValueError,
        r"reduction must be 'mean', 'sum' or a callable count\(targets\) .* got None",
    ),
    (
        "reduction-upper-case",
        step("MEAN"),
        ValueError,
        r"reduction must be 'mean', 'sum' .* got 'MEAN'",
    ),
    (
        "reduction-blanks",
        step(" sum "),
        ValueError,
        r"reduction must be 'mean', 'sum' .* got ' sum '",
    ),
    (
        "reduction-count-items-not-called",
        step(gpipe.count_items),
        TypeError,
        r"reduction=gpipe.count_items is the function that makes the count; call it: reduction=gpipe.count_items\(\)",
    ),
    (
        "reduction-builtin-sum",
        step(sum),
        TypeError,
        r"reduction=sum \(Python's built-in\) would weight each micro-batch by the sum of its target values.*reduction='sum' \(the string\)",
    ),
    ("reduction-builtin-max", step(max), TypeError, r"reduction=max \(Python's built-in\)"),
    (
        "reduction-negative-count",
        step(lambda t: -1),
        ValueError,
        r"reduction=<lambda> must return the number of items \(a count >= 0\) of micro-batch 0's targets, got -1",
    ),
    (
        "reduction-nan-count",
        step(lambda t: float("nan")),
        ValueError,
        r"must return the number of items .* got nan",
    ),
    (
        "reduction-string-count",
        step(lambda t: "3"),
        ValueError,
        r"must return the number of items .* got '3'",
    ),
    (
        "reduction-vector-count",
        step(lambda t: torch.tensor([1, 2])),
        ValueError,
        r"must return the number of items .* got tensor\(\[1, 2\]\)",
    ),
    (
        "reduction-bool-count",
        step(lambda t: True),
        ValueError,
        r"must return the number of items .* got True",
    ),
    (
        "reduction-count-raises",
        step(lambda t: 1 / 0),
        ValueError,
        r"reduction=<lambda> failed on micro-batch 0's targets \(ZeroDivisionError: division by zero\)",
    ),
    (
        "reduction-count-without-targets",
        lambda: gpipe.Pipe(mlp(), devices=["cpu"] * 2, chunks=2).step(
            X, None, lambda o, t: o.sum(), reduction=gpipe.count_items()
        ),
        ValueError,
        r"counts the items of each micro-batch's targets, but micro-batch 0 has none",
    ),
    (
        "count-items-string-index",
        lambda: gpipe.count_items(ignore_index="x"),
        TypeError,
        r"count_items\(ignore_index\) takes the target value to leave out \(a number, e.g. -100\), got str",
    ),
    (
        "count-items-given-the-targets",
        lambda: gpipe.count_items(torch.zeros(3)),
        TypeError,
        r"got Tensor; pass reduction=gpipe.count_items\(\) and the step counts each micro-batch's targets itself",
    ),
    (
        "count-items-bool-index",
        lambda: gpipe.count_items(ignore_index=True),
        TypeError,
        r"takes the target value to leave out .* got bool",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [r[1:] for r in RAISES], ids=[r[0] for r in RAISES]
)
def test_bad_input_is_named(call: Callable[[], Any], exc: type[BaseException], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_a_refused_reduction_leaves_every_gradient_untouched() -> None:
    pipe = gpipe.Pipe(mlp(), devices=["cpu"] * 2, chunks=2)
    for bad in (sum, gpipe.count_items, lambda t: 1 / 0):
        with pytest.raises((TypeError, ValueError)):
            pipe.step(X, torch.randint(0, 4, (8,)), F.cross_entropy, reduction=bad)
    assert all(p.grad is None for p in pipe.parameters())


# ---------------------------------------------------------------- results equal the plain model


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> dict:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def test_a_float_ignore_index_counts_as_the_int_one() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = X.double(), torch.tensor([0, 1, -100, 2, -100, -100, 3, 1])
    want = plain_step(model, x, y, F.cross_entropy)
    pipe = gpipe.Pipe(model, devices=["cpu"] * 2, chunks=4)
    pipe.step(x, y, F.cross_entropy, reduction=gpipe.count_items(ignore_index=-100.0))
    assert_same_grads(grads(model), want)


def test_count_items_on_float_targets_counts_every_element() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = X.double(), torch.randn(8, 4, dtype=torch.float64)
    want = plain_step(model, x, y, F.mse_loss)
    pipe = gpipe.Pipe(model, devices=["cpu"] * 2, chunks=2)
    pipe.step(x, y, F.mse_loss, reduction=gpipe.count_items())
    assert_same_grads(grads(model), want)


def test_len_as_the_count_is_a_mean_over_rows() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = X.double(), torch.randint(0, 4, (8,))
    want = plain_step(model, x, y, F.cross_entropy)
    gpipe.Pipe(model, devices=["cpu"] * 2, chunks=4).step(x, y, F.cross_entropy, reduction=len)
    assert_same_grads(grads(model), want)


def test_a_forward_returning_none_returns_none() -> None:
    model = ReturnsNone()
    assert gpipe.Pipe(model, sample=X, devices=["cpu"])(X) is model(X) is None


def test_a_split_point_given_twice_is_one_cut() -> None:
    twice = net_pipe(sample=X, split_points=["h.1", "h.1"])
    once = net_pipe(sample=X, split_points=["h.1"])
    assert twice.balance == once.balance == [1, 3]


def test_split_points_and_balance_are_refused_before_anything_is_built() -> None:
    model = Net()
    with pytest.raises(ValueError, match="give one of them"):
        gpipe.Pipe(model, sample=X, devices=["cpu"] * 2, split_points=["h.2"], balance=[2, 2])
    assert all(p.grad is None for p in model.parameters())


def test_an_empty_split_point_list_is_no_cut() -> None:
    assert capture(Net(), X, split_points=[]).split_balance is None


# ---------------------------------------------------------------- DistributedPipe, one rank


@pytest.fixture(scope="module")
def one_rank() -> Any:
    if dist.is_initialized():  # pragma: no cover - another module left one
        pytest.skip("a process group is already initialized")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def dpipe(**kw: Any) -> Callable[[], Any]:
    return lambda: gpipe.DistributedPipe(mlp(), **{"chunks": 2, "timeout": 30, **kw})


DIST_RAISES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    (
        "dist-stages-above-world",
        dpipe(stages=2),
        ValueError,
        r"1 ranks cannot form pipelines of 2 devices",
    ),
    (
        "dist-data-parallel-bool",
        dpipe(data_parallel=True),
        TypeError,
        r"data_parallel must be an int >= 1, got bool True",
    ),
    (
        "dist-device-cuda-missing",
        dpipe(device="cuda:0"),
        ValueError,
        r"device= 'cuda:0', but this machine has 0 CUDA device\(s\); pass a device that exists",
    ),
    (
        "dist-device-garbage",
        dpipe(device="gpu7"),
        ValueError,
        r"device= 'gpu7', which is not a device",
    ),
    (
        "dist-tied-unknown",
        dpipe(tied=[["0.weight", "9.weight"]]),
        ValueError,
        r"tied names '9.weight', which is not a parameter of the model",
    ),
    (
        "dist-tied-one-name",
        dpipe(tied=[["0.weight"]]),
        ValueError,
        r"a tie needs at least two parameter names",
    ),
    (
        "dist-tied-flat-list",
        dpipe(tied=["0.weight", "2.weight"]),
        TypeError,
        r"tied must be a list of groups of parameter names, e.g. \[\['0.weight', '2.weight'\]\], got \['0.weight', '2.weight'\]; wrap each group",
    ),
    (
        "dist-tied-shapes",
        dpipe(tied=[["0.weight", "1.bias"]]),
        ValueError,
        r"tied parameters '0.weight' \(4, 4\) and '1.bias' \(4,\) differ in shape",
    ),
    (
        "dist-batch-unknown",
        dpipe(batch="different"),
        ValueError,
        r"batch must be 'same' .* or 'per_replica' .* got 'different'",
    ),
    (
        "dist-init-fn-not-callable",
        dpipe(init_fn=3),
        TypeError,
        r"init_fn must be a function init_fn\(layer\) .* got int 3",
    ),
    (
        "dist-process-group-string",
        dpipe(process_group="world"),
        TypeError,
        r"process_group must be a torch.distributed ProcessGroup .* got str 'world'",
    ),
    (
        "dist-fetch-string",
        dpipe(fetch="0"),
        TypeError,
        r"fetch must be a list of names, got the string '0'; use \['0'\]",
    ),
    (
        "dist-auto-without-sample",
        dpipe(schedule="auto"),
        ValueError,
        r"DistributedPipe\(schedule='auto'\) plans at construction: pass sample=",
    ),
    (
        "dist-split-points-without-sample",
        dpipe(split_points=["1"]),
        TypeError,
        r"DistributedPipe got split_points, so it captures the model as a graph and needs an example call",
    ),
    (
        "dist-sample-empty-batch",
        lambda: gpipe.DistributedPipe(Net(), sample=X[:0], chunks=2, timeout=30),
        ValueError,
        r"sample= has 0 rows",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [r[1:] for r in DIST_RAISES], ids=[r[0] for r in DIST_RAISES]
)
def test_distributed_pipe_options_are_named(
    one_rank: None, call: Callable[[], Any], exc: type[BaseException], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_one_rank_distributed_pipe_of_a_captured_model_equals_the_model(one_rank: None) -> None:
    torch.manual_seed(0)
    model = Net().double()
    x, y = X.double(), torch.randn(8, 4, dtype=torch.float64)
    want = plain_step(model, x, y, F.mse_loss)
    pipe = gpipe.DistributedPipe(model, sample=x, chunks=2, timeout=30)
    try:
        pipe.step(x, y, F.mse_loss)
        assert_same_grads(grads(model), want)
    finally:
        pipe.close()


# ---------------------------------------------------------------- gpipe train / gpipe plan

TINY = [
    "--model-preset",
    "tiny",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-batches",
    "1",
    "--eval-interval",
    "0",
    "--max-bytes",
    "20000",
    "--no-progress",
    "--steps",
    "1",
]
PLAN = ["plan", "--model-preset", "tiny"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe2")
    (root / "data.txt").write_text("def f(x):\n    return x * 2  # a line of Python\n" * 200)
    return root


def train(folder: Path, *argv: str, toml: str | None = None, auto: bool = False) -> list[str]:
    args = ["train", *TINY, "--data", str(folder / "data.txt"), "--out", str(folder / "out")]
    args += ["--auto"] if auto else ["--chunks", "2"]
    if toml is not None:
        path = folder / f"cfg-{abs(hash(toml))}.toml"
        path.write_text(toml)
        args += ["--config", str(path)]
    return [*args, *argv]


# (id, argv builder, message regex of the one error line)
CLI: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "train-virtual-stages-zero",
        lambda f: train(f, "--virtual-stages", "0"),
        r"virtual_stages must be an integer >= 1, got 0; pass --virtual-stages 1 or more",
    ),
    (
        "train-virtual-stages-without-interleaved",
        lambda f: train(f, "--virtual-stages", "3"),
        r"virtual_stages=3 needs schedule='interleaved' or 'interleaved-zb', not 'gpipe'",
    ),
    (
        "train-too-many-virtual-stages",
        lambda f: train(f, "--schedule", "interleaved", "--virtual-stages", "3", "--stages", "2"),
        r"2 stages x 3 virtual stages = 6 exceeds the model's 4 layers",
    ),
    (
        "train-out-empty",
        lambda f: train(f, "--out", ""),
        r"out must be a folder path, got '' \(--out\)",
    ),
    (
        "train-max-bytes-negative",
        lambda f: train(f, "--max-bytes", "-5"),
        r"max_bytes must be an integer >= 1, got -5",
    ),
    (
        "train-tune-without-auto",
        lambda f: train(f, "--tune", "2"),
        r"--tune 2 times the planner's choices: add --auto, or drop --tune",
    ),
    (
        "train-memory-limit-without-auto",
        lambda f: train(f, "--memory-limit", "8GiB"),
        r"--memory-limit 8GiB is the limit the planner plans under: add --auto",
    ),
    (
        "train-auto-with-schedule",
        lambda f: train(f, "--schedule", "1f1b", auto=True),
        r"--auto chooses .* so --schedule cannot be given with it",
    ),
    (
        "train-auto-with-virtual-stages",
        lambda f: train(f, "--virtual-stages", "2", auto=True),
        r"--auto chooses the schedule, chunks, virtual stages, remat and balance, so --virtual-stages cannot be given with it",
    ),
    (
        "train-auto-with-remat",
        lambda f: train(f, "--remat", "never", auto=True),
        r"so --remat cannot be given with it",
    ),
    (
        "train-auto-tune-negative",
        lambda f: train(f, "--tune", "-1", auto=True),
        r"--tune must be >= 1, got -1",
    ),
    (
        "train-auto-memory-garbage",
        lambda f: train(f, "--memory-limit", "lots", auto=True),
        r"--memory-limit: cannot read the memory size 'lots'",
    ),
    (
        "train-auto-memory-zero",
        lambda f: train(f, "--memory-limit", "0", auto=True),
        r"--memory-limit: a memory size must be positive, got '0'",
    ),
    (
        "train-model-with-preset",
        lambda f: train(f, "--model", "nocolon"),
        r"--model nocolon builds its own model, so --model-preset .* cannot be given with it",
    ),
    (
        "config-n-layers-zero",
        lambda f: train(f, toml="[model]\nn_layers = 0\n"),
        r"model.n_layers must be an integer >= 1, got 0",
    ),
    (
        "config-n-heads-zero",
        lambda f: train(f, toml="[model]\nn_heads = 0\n"),
        r"model.n_heads must be an integer >= 1, got 0",
    ),
    (
        "config-d-model-zero",
        lambda f: train(f, toml="[model]\nd_model = 0\n"),
        r"model.d_model must be an integer >= 1, got 0",
    ),
    (
        "config-d-ff-negative",
        lambda f: train(f, toml="[model]\nd_ff = -1\n"),
        r"model.d_ff must be an integer >= 1, got -1",
    ),
    (
        "config-vocab-zero",
        lambda f: train(f, toml="[model]\nvocab_size = 0\n"),
        r"model.vocab_size must be an integer >= 1, got 0",
    ),
    (
        "config-max-seq-len-zero",
        lambda f: train(f, toml="[model]\nmax_seq_len = 0\n"),
        r"model.max_seq_len must be an integer >= 1, got 0",
    ),
    (
        "config-dropout-string",
        lambda f: train(f, toml='[model]\ndropout = "none"\n'),
        r"model.dropout must be a finite number, got 'none'",
    ),
    (
        "config-beta1-one",
        lambda f: train(f, toml="beta1 = 1.0\n"),
        r"beta1 must be a finite number in \[0, 1\), got 1.0",
    ),
    (
        "config-beta2-negative",
        lambda f: train(f, toml="beta2 = -0.1\n"),
        r"beta2 must be a finite number in \[0, 1\), got -0.1",
    ),
    (
        "config-beta1-string",
        lambda f: train(f, toml='beta1 = "x"\n'),
        r"beta1 must be a finite number in \[0, 1\), got 'x'",
    ),
    (
        "config-optim-table",
        lambda f: train(f, toml="[optim]\nlr = 0.1\n"),
        r"unknown option 'optim'; known options:",
    ),
    (
        "config-array-of-tables",
        lambda f: train(f, toml="[[model]]\nd_model = 8\n"),
        r"model must be a \[model\] table of TransformerConfig fields, got \[\{'d_model': 8\}\]",
    ),
    (
        "config-seed-float",
        lambda f: train(f, toml="seed = 1.5\n"),
        r"seed must fit in 64 bits \(\|seed\| < 2\*\*63\), got 1.5",
    ),
    (
        "config-seed-string",
        lambda f: train(f, toml='seed = "1"\n'),
        r"seed must fit in 64 bits .* got '1'",
    ),
    ("config-resume-key", lambda f: train(f, toml="resume = true\n"), r"unknown option 'resume'"),
    (
        "config-precision-number",
        lambda f: train(f, toml="precision = 16\n"),
        r"precision must be one of fp32, bf16, fp16, got 16 \(--precision\)",
    ),
    (
        "config-memory-limit-key",
        lambda f: train(f, toml="memory_limit = -1\n"),
        r"unknown option 'memory_limit'",
    ),
    (
        "plan-memory-limit-without-auto",
        lambda f: [*PLAN, "--memory-limit", "8GiB"],
        r"--memory-limit only shapes the --auto ranking: add --auto, or drop --memory-limit",
    ),
    (
        "plan-optimizer-without-auto",
        lambda f: [*PLAN, "--optimizer", "sgd"],
        r"--optimizer only shapes the --auto ranking",
    ),
    (
        "plan-top-without-auto",
        lambda f: [*PLAN, "--top", "3"],
        r"--top only shapes the --auto ranking",
    ),
    (
        "plan-auto-with-schedule",
        lambda f: [*PLAN, "--auto", "--schedule", "gpipe"],
        r"--auto chooses the schedule and the chunks itself, so --schedule cannot be given with it",
    ),
    (
        "plan-auto-with-chunks",
        lambda f: [*PLAN, "--auto", "--chunks", "2"],
        r"so --chunks cannot be given with it",
    ),
    (
        "plan-auto-memory-garbage",
        lambda f: [*PLAN, "--auto", "--memory-limit", "lots"],
        r"--memory-limit: cannot read the memory size 'lots'",
    ),
    (
        "plan-auto-optimizer-unknown",
        lambda f: [*PLAN, "--auto", "--optimizer", "adamw2"],
        r"--auto: unknown optimizer 'adamw2'",
    ),
    ("plan-auto-top-zero", lambda f: [*PLAN, "--auto", "--top", "0"], r"--top must be >= 1, got 0"),
    (
        "plan-auto-memory-too-small",
        lambda f: [*PLAN, "--auto", "--memory-limit", "1KiB"],
        r"no configuration fits memory_limit=1.00 KiB",
    ),
    (
        "plan-input-dtype-without-model",
        lambda f: [*PLAN, "--input-dtype", "int64"],
        r"--input-shape and --input-dtype describe the input of --model",
    ),
]


@pytest.mark.parametrize(("argv", "match"), [r[1:] for r in CLI], ids=[r[0] for r in CLI])
def test_a_cli_mistake_is_one_usage_line(
    folder: Path, capsys: pytest.CaptureFixture, argv: Callable, match: str
) -> None:
    assert main(argv(folder)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpipe: error: "), lines
    assert re.search(match, lines[0]), lines[0]


def test_a_config_file_with_a_byte_order_mark_is_read(folder: Path) -> None:
    """Windows editors start UTF-8 files with a BOM; tomllib refused it as "Invalid statement"."""
    path = folder / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbflr = 0.0125\n")
    argv = train(folder, "--config", str(path), "--out", str(folder / "bom"))
    assert main(argv) == 0
    assert json.loads((folder / "bom" / "config.json").read_text())["lr"] == 0.0125


def test_plan_without_auto_keeps_its_defaults(capsys: pytest.CaptureFixture) -> None:
    assert main([*PLAN, "--stages", "1"]) == 0
    assert "K=1, M=4" in capsys.readouterr().out
