"""Tuning: the planner's top configurations timed on the real model, the measured fastest
chosen, and no trace of the timed steps left on the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpipe
import reference_impl
from gpipe.local import autotune as at
from gpipe.local import race
from gpipe.planner.autoplan import autoplan


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, 16), nn.BatchNorm1d(16)]
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.Dropout(0.2), nn.Tanh()]
    return nn.Sequential(*layers).double()


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(16, 16, generator=g, dtype=torch.float64),
        torch.randn(16, 16, generator=g, dtype=torch.float64),
    )


DEVICES = ["cpu", "cpu"]


@pytest.fixture
def fake_clock(monkeypatch):
    """Every timed configuration gets a made-up step time (its planner rank's entry in
    ``clock.times``, 10 s when absent); the steps still run once each."""

    class Clock:
        def __init__(self) -> None:
            self.times: dict[int, float] = {}
            self.built: list[int] = []

    clock = Clock()

    built_pipe = gpipe.Pipe.from_configuration

    def pipe_for(cls, module, c, devices=None):
        clock.built.append(c.rank)
        return built_pipe(module, c, devices=devices)

    def time_steps(step, steps, warmup):
        step()
        return clock.times.get(clock.built[-1], 10.0)

    monkeypatch.setattr(gpipe.Pipe, "from_configuration", classmethod(pipe_for))
    monkeypatch.setattr(race, "median_time", time_steps)
    return clock


def test_the_measured_fastest_comes_first_whatever_the_planner_said(fake_clock):
    x, y = _batch()
    ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"], max_chunks=8)
    fake_clock.times = {1: 3.0, 2: 5.0, 3: 1.0, 4: 2.0}
    measured = at.autotune(_model(), ranked, x, y, _loss, devices=DEVICES, top=4, rounds=2)
    assert [m.configuration.rank for m in measured] == [3, 4, 1, 2]
    assert [m.step_time for m in measured] == [1.0, 2.0, 3.0, 5.0]
    assert all(len(m.times) == 2 for m in measured)
    # two rounds, the second in the opposite order: drift favours no configuration; no race,
    # since none is within 5% of the fastest
    assert fake_clock.built == [1, 2, 3, 4, 4, 3, 2, 1]
    text = at.table(measured)
    assert text.splitlines()[2].split()[:2] == ["1", "3"] and "(3.00x)" in text


def test_configurations_within_a_few_percent_of_the_fastest_race_on(fake_clock):
    x, y = _batch()
    ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"], max_chunks=8)
    fake_clock.times = {1: 1.03, 2: 1.0, 3: 2.0}
    measured = at.autotune(_model(), ranked, x, y, _loss, devices=DEVICES, top=3, rounds=2)
    assert [m.configuration.rank for m in measured] == [2, 1, 3]
    # 1 and 2 are 3% apart: two more rounds for them alone, alternating; 3 is not timed again
    assert fake_clock.built == [1, 2, 3, 3, 2, 1, 1, 2, 2, 1]
    assert [len(m.times) for m in measured] == [4, 4, 2]


def test_tuning_leaves_no_trace_on_the_model():
    x, y = _batch()
    model = _model()
    ranked = autoplan(
        list(model), x, devices=DEVICES, remat_modes=["never", "always"], max_chunks=8
    )
    first = model[0].weight
    first.grad = torch.full_like(first, 0.5)
    bn = model[1]
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    measured = at.autotune(model, ranked, x, y, _loss, devices=DEVICES, top=2, steps=1)
    assert len(measured) == 2 and all(m.step_time > 0 for m in measured)
    assert first.grad is not None and torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    # the premise: a timed step does move the statistics and the gradients
    pipe = gpipe.Pipe(model, devices=DEVICES, balance=list(ranked[0].balance), chunks=2)
    try:
        pipe.step(x, y, _loss)
    finally:
        pipe.close()
    assert not torch.equal(bn.running_mean, stats[0]) and bn.num_batches_tracked.item() >= 1


def test_auto_tune_trains_the_measured_fastest_and_equals_the_reference(fake_clock):
    x, y = _batch()
    model = _model()
    ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"], max_chunks=8)
    fake_clock.times = {3: 1.0}  # the planner's third is the fastest
    auto = gpipe.Auto(tune=3, remat_modes=["never"], max_chunks=8)
    pipe = gpipe.Pipe(model, devices=DEVICES, schedule=auto, seed=5)
    try:
        loss = pipe.step(x, y, _loss)
        chosen = pipe.auto_plan
        assert chosen is not None and chosen.describe() == ranked[2].describe()
        assert auto.measured is not None and auto.measured[0].configuration is chosen
        assert (pipe.schedule_name, pipe.chunks, pipe.balance) == (
            chosen.schedule,
            chosen.chunks,
            list(chosen.balance),
        )
        got = [p.grad.clone() for p in model.parameters()]
        stats = [b.clone() for b in model.buffers()]
    finally:
        pipe.close()
    ref = _model()
    ref_loss = reference_impl.step(ref, x, y, _loss, chunks=chosen.chunks, seed=5, step=0)
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    for a, b in zip(got, [p.grad for p in ref.parameters()], strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    # one step's statistics, not the tuning steps' as well: those of the same configuration
    # run once on a fresh model, untuned
    again = _model()
    direct = gpipe.Pipe(again, devices=DEVICES, balance=list(chosen.balance), chunks=chosen.chunks,
                        schedule=chosen.schedule, remat=chosen.remat, seed=5)  # fmt: skip
    try:
        direct.step(x, y, _loss)
    finally:
        direct.close()
    assert all(torch.equal(a, b) for a, b in zip(stats, again.buffers(), strict=True))


def test_auto_tune_refuses_what_it_cannot_time():
    x, _ = _batch()
    pipe = gpipe.Pipe(_model(), devices=DEVICES, schedule=gpipe.Auto(tune=2))
    try:
        with pytest.raises(ValueError, match=r"first call must be pipe.step\(inputs, targets"):
            pipe(x)
    finally:
        pipe.close()
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="tune must be an integer >= 0"):
            gpipe.Auto(tune=bad)
    with pytest.raises(ValueError, match="tune_steps must be an integer >= 1"):
        gpipe.Auto(tune=2, tune_steps=0)
    ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"], max_chunks=8)
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        at.autotune(_model(), ranked, x, x, _loss, top=0)
    with pytest.raises(ValueError, match="cannot tune: each rank would time"):
        gpipe.Auto(tune=2).for_distributed(_model(), x, stages=2, data_parallel=1, chunks=None)


def test_a_configuration_that_fails_names_itself(monkeypatch):
    x, y = _batch()
    ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"], max_chunks=8)

    def broken(step, steps, warmup):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(race, "median_time", broken)
    with pytest.raises(
        RuntimeError, match=r"configuration #1 \(.* M=\d+, remat never.*out of memory"
    ):
        at.autotune(_model(), ranked, x, y, _loss, devices=DEVICES, top=2)


def test_gpipe_train_auto_tune_prints_the_measurements_and_trains_the_fastest(capsys, tmp_path):
    import json

    from gpipe.cli.main import main

    out = tmp_path / "run"
    argv = ["train", "--auto", "--tune", "2", "--model-preset", "tiny", "--batch-size", "8"]
    argv += ["--seq-len", "16", "--steps", "1", "--eval-interval", "0"]
    assert main([*argv, "--checkpoint-interval", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#  plan #"))
    fastest = lines[head + 2]
    assert lines[head + 3].startswith("2 ") and "x)" in lines[head + 3]
    chosen = next(line for line in lines if line.startswith("training with: "))
    assert chosen[len("training with: ") :] in fastest
    recorded = json.loads((out / "config.json").read_text())
    assert f"M={recorded['chunks']}, remat {recorded['remat']}" in fastest
    assert main(["train", "--tune", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--tune 2 times the planner's choices: add --auto" in capsys.readouterr().err
    assert main(["train", "--auto", "--tune", "2", "--runtime", "dist", "--out", str(out)]) == 2
    assert "--tune times configurations in this process" in capsys.readouterr().err


def test_the_planner_skips_micro_batches_a_layer_cannot_take_and_says_so():
    x, _ = _batch()  # 16 rows: M=16 would give BatchNorm one row per micro-batch
    with pytest.warns(UserWarning, match=r"M=16 and more skipped, micro-batches of 1 row"):
        ranked = autoplan(list(_model()), x, devices=DEVICES, remat_modes=["never"])
    assert max(c.chunks for c in ranked) == 8
    with pytest.raises(RuntimeError, match="BatchNorm1d"):  # the smallest M failing is an error
        autoplan(list(_model()), x[:1], devices=DEVICES, remat_modes=["never"])


class _Residual(nn.Module):
    """Not a sequence: the pipe captures it, and the timed pipes cut the same capture."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)) + h) * scale


def test_auto_tune_of_a_captured_model_equals_the_plain_models_gradients():
    x, y = _batch()
    model = _Residual().double()
    auto = gpipe.Auto(tune=2, remat_modes=["never"], max_chunks=4)
    pipe = gpipe.Pipe(model, sample=gpipe.capture.Sample(x, scale=2.0), devices=DEVICES,
                      schedule=auto)  # fmt: skip
    try:
        loss = pipe.step(gpipe.capture.Sample(x, scale=2.0), y, _loss)
        assert auto.measured is not None and len(auto.measured) == 2
        got = [p.grad.clone() for p in model.parameters()]
    finally:
        pipe.close()
    plain = _Residual().double()
    m = pipe.auto_plan.chunks
    ref = sum(_loss(plain(xs, scale=2.0), ys) / m for xs, ys in zip(x.chunk(m), y.chunk(m)))
    ref.backward()
    assert torch.allclose(loss, ref.detach(), atol=1e-12)
    for a, b in zip(got, [p.grad for p in plain.parameters()], strict=True):
        assert torch.allclose(a, b, atol=1e-10)
