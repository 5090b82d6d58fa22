"""The planner: ranking, memory limits, the memory model's terms, and ``schedule="auto"``."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gpipe
import reference_impl
from gpipe.models import TransformerConfig, TransformerLM
from gpipe.planner import memory_model as mm
from gpipe.planner.autoplan import NoFitError, autoplan, mm_fmt, table
from gpipe.planner.cost import profile
from gpipe.planner.simulate import simulate
from gpipe.schedules import get


def _tiny_lm() -> tuple[nn.Module, torch.Tensor]:
    cfg = TransformerConfig.preset("tiny").replace(dropout=0.0)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    return model, torch.zeros(16, 32, dtype=torch.long, device="meta")


@pytest.fixture(scope="module")
def unlimited():
    model, x = _tiny_lm()
    return autoplan(model, x, devices=2, max_chunks=4)


def test_unlimited_ranking_is_by_predicted_step_time(unlimited):
    times = [c.step_time for c in unlimited]
    assert times == sorted(times)
    assert [c.rank for c in unlimited] == list(range(1, len(unlimited) + 1))
    assert all(c.fits for c in unlimited)
    assert {c.remat for c in unlimited} == {"always", "except_last", "never"}
    assert {c.chunks for c in unlimited} == {1, 2, 4}
    assert "interleaved" in {c.schedule for c in unlimited}
    assert unlimited[0].reason.startswith("fastest that fits")
    assert unlimited[0].cost_source == "flops"


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2"])
def test_a_whole_backward_costs_the_same_in_every_schedule(name):
    """A zero-bubble schedule leaves most backwards whole (``Schedule.splits``): those cost
    what 1F1B's do, and only a split pair costs ``split_extra`` more (its ``B + W`` is the
    whole backward times ``1 + split_extra``). The planner used to add the split's extra to
    every backward, 1F1B's too, and a second action's overhead to a split schedule's whole
    ones, while its split pairs cost no more than a whole backward."""
    model, x = _tiny_lm()
    extra = 0.2
    plans = autoplan(model, x, devices=2, chunks=[8], schedules=["1f1b", name],
                     remat_modes=["never"], split_extra=extra)  # fmt: skip
    by = {c.schedule: c for c in plans}
    ref, zb = by["1f1b"], by[name]
    assert ref.balance == zb.balance
    whole = {e.action.stage: e.end - e.start for e in ref.simulation.events if e.action.kind == "B"}
    sched = get(name, 2, 8)
    spans: dict[tuple[int, int], float] = {}
    n_whole = 0
    for e in zb.simulation.events:
        a = e.action
        if a.kind == "F":
            continue
        if a.kind == "B" and not sched.splits(a.stage, a.microbatch):
            assert e.end - e.start == pytest.approx(whole[a.stage], rel=1e-9), a
            n_whole += 1
        else:
            spans[(a.stage, a.microbatch)] = spans.get((a.stage, a.microbatch), 0) + e.end - e.start
    assert n_whole > 0 and spans
    for (stage, _), t in spans.items():
        assert t == pytest.approx(whole[stage] * (1 + extra), rel=1e-9), (stage, t)


def test_measured_costs_put_a_layer_without_parameters_wholly_in_b():
    """``measure`` times the whole backward as one walk and ``B`` as the walk that prunes the
    weight gradients; ``W`` is the rest, none for a layer without parameters."""
    from gpipe.planner import layer_timing

    torch.manual_seed(0)
    layers = [nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)]
    before = [p.grad for layer in layers for p in layer.parameters()]
    times = layer_timing.measure(layers, (torch.randn(8, 16),), repeats=2)
    assert len(times) == 3 and all(t >= 0 for row in times for t in row)
    assert times[1][2] == 0.0 and times[1][1] > 0  # Tanh: all of its backward is B
    assert times[0][1] == 0.0 and times[0][2] > 0  # first layer: no input gradient wanted
    assert times[2][1] > 0
    assert [p.grad for layer in layers for p in layer.parameters()] == before


def test_a_looser_limit_never_gives_a_slower_top_plan(unlimited):
    model, x = _tiny_lm()
    peaks = sorted({c.peak_memory for c in unlimited})
    limits = [peaks[0], peaks[len(peaks) // 3], peaks[len(peaks) // 2], peaks[-1]]
    tops = [
        autoplan(model, x, devices=2, max_chunks=4, memory_limit=lim, headroom=0)[0]
        for lim in limits
    ]
    for tighter, looser in itertools.pairwise(tops):
        assert looser.step_time <= tighter.step_time
    assert tops[-1].step_time == unlimited[0].step_time
    assert tops[0].step_time >= tops[-1].step_time


def test_top_plan_fits_on_every_device(unlimited):
    model, x = _tiny_lm()
    peaks = sorted(c.peak_memory for c in unlimited)
    limit = peaks[len(peaks) // 4]
    ranked = autoplan(model, x, devices=2, max_chunks=4, memory_limit=limit, headroom=0)
    top = ranked[0]
    assert top.fits and all(d.total <= limit for d in top.memory)
    assert any(not c.fits for c in ranked)  # the limit rules some out
    assert all(c.fits for c in ranked[: sum(c.fits for c in ranked)])  # fitting ones first
    assert "does not fit" in ranked[-1].reason
    # by default a plan must leave 15% of the limit free
    spared = autoplan(model, x, devices=2, max_chunks=4, memory_limit=limit)[0]
    assert spared.peak_memory <= 0.85 * limit
    # the unlimited winner needs more than the limit, so the choice changed
    assert unlimited[0].peak_memory > limit or unlimited[0].describe() == top.describe()


def test_no_fit_error_names_the_smallest_peak_and_its_device(unlimited):
    model, x = _tiny_lm()
    smallest = min(unlimited, key=lambda c: c.peak_memory)
    with pytest.raises(NoFitError) as info:
        autoplan(model, x, devices=2, max_chunks=4, memory_limit="1KiB")
    text = str(info.value)
    assert "memory_limit=1.00 KiB" in text
    assert f"smallest peak any reaches is {mm_fmt(smallest.peak_memory)}" in text
    assert f"on device {smallest.peak_device}" in text


def test_shared_memory_limit_applies_to_the_joint_peak():
    model, x = _tiny_lm()
    ranked = autoplan(model, x, devices=["cpu", "cpu"], max_chunks=4)
    assert all(c.shared_peak is not None for c in ranked)
    for c in ranked:  # the joint peak is at most every device's peak added up
        assert max(d.total for d in c.memory) <= c.shared_peak <= sum(d.total for d in c.memory)
    with pytest.raises(NoFitError, match="all stages together"):
        autoplan(model, x, devices=["cpu", "cpu"], max_chunks=4, memory_limit=1000)


def test_table_lists_the_top_configurations(unlimited):
    text = table(unlimited, top=3)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("#")
    assert unlimited[0].schedule in lines[2] and "fastest that fits" in lines[2]


# ------------------------------------------------------------------ memory model by hand


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_memory_terms_of_a_tiny_model_match_hand_computed_values():
    rows = 3  # one micro-batch: batch 6, M = 2
    costs = profile(_mlp(), torch.zeros(rows, 4))
    stages = mm.stage_memory(costs, [2, 1], input_bytes=rows * 4 * 4)
    f32 = 4
    p0, p1 = (4 * 8 + 8) * f32, (8 * 2 + 2) * f32
    kept0 = rows * 4 * f32 + rows * 8 * f32  # Linear saves its input, ReLU its output
    kept1 = rows * 8 * f32 + rows * 2 * f32  # Linear's input + the loss's copy of the logits
    assert [s.params for s in stages] == [p0, p1]
    assert [s.kept for s in stages] == [kept0, kept1]
    assert [s.input for s in stages] == [rows * 4 * f32, rows * 8 * f32]

    sched = get("gpipe", 2, 2)
    dev0, dev1 = mm.device_memory(sched, stages, "never", "adam")
    assert (dev0.parameters, dev0.gradients, dev0.optimizer) == (p0, p0, 2 * p0)
    assert (dev1.parameters, dev1.gradients, dev1.optimizer) == (p1, p1, 2 * p1)
    # GPipe keeps both micro-batches' graphs; the first backward adds its boundary gradients
    assert dev0.activations == 2 * kept0 and dev0.remat_inputs == 0
    workspace0 = max(c.saved_bytes for c in costs[:2])
    assert stages[0].workspace == workspace0 == rows * 8 * f32
    assert dev0.transient == rows * 4 * f32 + rows * 8 * f32 + workspace0
    assert dev0.total == 4 * p0 + 2 * kept0 + dev0.transient

    remat0, _ = mm.device_memory(sched, stages, "always", "sgd")
    assert remat0.optimizer == 0
    assert remat0.activations == 0 and remat0.remat_inputs == 2 * rows * 4 * f32
    # while a backward runs, its recomputed graph and its boundary gradients are live
    assert remat0.transient == kept0 + rows * 4 * f32 + rows * 8 * f32 + workspace0

    one_f_one_b = mm.device_memory(get("1f1b", 2, 2), stages, "never", "adam")
    assert one_f_one_b[1].activations == kept1  # 1F1B's last device holds one micro-batch

    # a split backward keeps, from B to W, each Linear call's input and output gradient — or,
    # on the first stage, which captures nothing, its whole graph
    assert [c.deferred_bytes for c in costs] == [rows * (4 + 8) * f32, 0, rows * (8 + 2) * f32]
    deferred1 = rows * (8 + 2) * f32
    assert [s.deferred for s in stages] == [kept0, deferred1]
    zb = mm.device_memory(get("zb-h1", 2, 2), stages, "never", "adam")
    # device 1 runs F0 B0 F1 B1 W0 W1: at B1, micro-batch 1's graph and both W parts are held
    assert zb[1].activations == kept1 + 2 * deferred1
    assert zb[1].transient == stages[1].input + stages[1].output + stages[1].workspace
    zb_remat = mm.device_memory(get("zb-h1", 2, 2), stages, "always", "adam")
    # re-materialized: the inputs and W's parts; B1 recomputes micro-batch 1's graph
    assert zb_remat[1].activations == 2 * deferred1
    assert zb_remat[1].transient == kept1 + zb[1].transient


def test_optimizer_slots_and_sizes():
    assert mm.optimizer_slots("Adam") == 2 and mm.optimizer_slots("sgd") == 0
    assert mm.optimizer_slots(3) == 3
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        mm.optimizer_slots("lion")
    assert mm.parse_bytes("8GiB") == 8 * 2**30
    assert mm.parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="cannot read the memory size"):
        mm.parse_bytes("eight gigs")


# what torch's optimizers keep per parameter: (constructor, keyword arguments)
TORCH_OPTIMIZERS = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
}


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_optimizer_slots_count_the_tensors_torch_keeps(name):
    make, kwargs = TORCH_OPTIMIZERS[name]
    params = [nn.Parameter(torch.randn(3, 5, dtype=torch.float64)), nn.Parameter(torch.randn(7))]
    opt = make(params, **kwargs)
    sum(p.sum() for p in params).backward()
    opt.step()
    for p in params:  # tensors of the parameter's size and dtype (not Adam's scalar step)
        like = [t for t in opt.state[p].values() if torch.is_tensor(t) and t.shape == p.shape]
        assert all(t.dtype == p.dtype for t in like)
        assert len(like) == mm.optimizer_slots(name), name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_joint_peak_holds_every_devices_parameters_gradients_and_optimizer(optimizer):
    costs = profile(_mlp(), torch.zeros(3, 4))
    stages = mm.stage_memory(costs, [1, 1, 1], input_bytes=3 * 4 * 4)
    sched = get("1f1b", 3, 4)
    devices = mm.device_memory(sched, stages, "never", optimizer)
    static = sum(d.parameters + d.buffers + d.gradients + d.optimizer for d in devices)
    # with no action running, stages sharing one memory hold exactly their static state
    assert mm.process_peak([], sched, stages, "never", optimizer) == static
    # and while the step runs, that state plus the live micro-batches
    joint = mm.process_peak(simulate(sched).events, sched, stages, "never", optimizer)
    assert joint > static


# ------------------------------------------------------------------ schedule="auto"


def _mlp_stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Dropout(0.2), nn.Tanh()]
    return nn.Sequential(*layers).double()


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("limit", [None, "tight"])
def test_schedule_auto_trains_the_top_plan_and_equals_the_reference(limit):

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(16, 16, generator=g, dtype=torch.float64)
    devices = ["cpu", "cpu"]
    if limit == "tight":  # a limit only part of the configurations meet
        peaks = sorted(c.peak_memory for c in autoplan(list(_mlp_stack()), x, devices=devices))
        limit = peaks[len(peaks) // 3]
    expected = autoplan(list(_mlp_stack()), x, devices=devices, memory_limit=limit, headroom=0)[0]
    model = _mlp_stack()
    schedule = "auto" if limit is None else gpipe.Auto(memory_limit=limit, headroom=0)
    pipe = gpipe.Pipe(model, devices=devices, schedule=schedule, seed=7)
    try:
        loss = pipe.step(x, y, _loss)
        top = pipe.auto_plan
        assert top is not None and top.describe() == expected.describe()
        assert (pipe.schedule_name, pipe.chunks, pipe.remat) == (
            top.schedule,
            top.chunks,
            top.remat,
        )
        assert pipe.balance == list(top.balance)
        assert limit is None or top.peak_memory <= limit
        got = [p.grad.clone() for p in model.parameters()]
    finally:
        pipe.close()
    ref = _mlp_stack()
    ref_loss = reference_impl.step(ref, x, y, _loss, chunks=top.chunks, seed=7, step=0)
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    for a, b in zip(got, [p.grad for p in ref.parameters()], strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_schedule_auto_keeps_the_users_chunks_and_refuses_a_balance():
    x = torch.randn(8, 16, dtype=torch.float64)
    pipe = gpipe.Pipe(_mlp_stack(), devices=["cpu", "cpu"], schedule="auto", chunks=4)
    try:
        pipe.step(x, torch.zeros_like(x), _loss)
        assert pipe.chunks == 4 and pipe.auto_plan.chunks == 4
    finally:
        pipe.close()
    with pytest.raises(ValueError, match="schedule='auto' chooses the balance"):
        gpipe.Pipe(_mlp_stack(), devices=["cpu", "cpu"], schedule="auto", balance=[9, 9])


def _dist_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 16, generator=g, dtype=torch.float64)
    return x, torch.randn(16, 16, generator=g, dtype=torch.float64)


def _dist_rank(rank: int, init: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from gpipe import DistributedPipe

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        x, y = _dist_batch()
        pipe = DistributedPipe(_mlp_stack(), schedule="auto", sample=x, seed=7, timeout=120)
        loss = pipe.step(x, y, _loss)
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        top = pipe.auto_plan
        torch.save({"loss": loss, "grads": grads, "plan": top.describe(), "m": top.chunks},
                   f"{out}/rank{rank}.pt")  # fmt: skip
        pipe.close()
    finally:
        dist.destroy_process_group()


def test_distributed_schedule_auto_trains_the_top_plan_and_equals_the_reference(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path}/store"
    procs = [ctx.Process(target=_dist_rank, args=(r, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    x, y = _dist_batch()
    expected = autoplan(list(_mlp_stack()), x, devices=2)[0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert {r["plan"] for r in ranks} == {expected.describe()}
    ref = _mlp_stack()
    ref_loss = reference_impl.step(ref, x, y, _loss, chunks=expected.chunks, seed=7, step=0)
    ref_grads = dict(ref.named_parameters())
    got = {n: g for r in ranks for n, g in r["grads"].items()}
    assert set(got) == set(ref_grads)
    for n, g in got.items():
        assert torch.allclose(g, ref_grads[n].grad, atol=1e-10), n
    assert torch.allclose(ranks[0]["loss"], ref_loss, atol=1e-12)


# ------------------------------------------------------------------ the command line


def test_gpipe_plan_auto_prints_the_ranking(capsys, tmp_path):
    from gpipe.cli.main import main

    png = tmp_path / "top.png"
    argv = ["plan", "--auto", "--model-preset", "tiny", "--batch-size", "8", "--top", "3"]
    assert main([*argv, "--memory-limit", "64MiB", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#  schedule"))
    assert lines[head + 2].startswith("1 ") and "fastest that fits" in lines[head + 2]
    assert lines[head + 4].startswith("3 ")
    assert "chosen: " in out and "device 1: " in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpipe_plan_auto_with_a_limit_nothing_fits_is_one_error_line(capsys):
    from gpipe.cli.main import main

    argv = ["plan", "--auto", "--model-preset", "tiny", "--batch-size", "8"]
    assert main([*argv, "--memory-limit", "1KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no configuration fits memory_limit=1.00 KiB" in err[0]
    assert "smallest peak any reaches is" in err[0] and " on device " in err[0]
    assert main([*argv, "--memory-limit", "lots"]) == 2
    assert "--memory-limit: cannot read the memory size 'lots'" in capsys.readouterr().err


def test_gpipe_train_auto_trains_with_the_top_plan_and_its_balance(capsys, tmp_path):
    import json

    from gpipe.cli.main import main
    from gpipe.cli.plan_auto import auto_train_config
    from gpipe.train.config import TrainConfig

    out = tmp_path / "run"
    argv = ["train", "--auto", "--model-preset", "tiny", "--batch-size", "8", "--seq-len", "16"]
    argv += ["--steps", "2", "--eval-interval", "0", "--checkpoint-interval", "0"]
    assert main([*argv, "--memory-limit", "64MiB", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training with: " in printed
    base = TrainConfig(model_preset="tiny", batch_size=8, seq_len=16, steps=2, out=str(out))
    top = auto_train_config(base, "64MiB", say=False)
    assert top.balance is not None and sum(top.balance) > 0
    recorded = json.loads((out / "config.json").read_text())
    for key in ("schedule", "chunks", "remat", "balance"):
        assert recorded[key] == getattr(top, key), key
    (manifest,) = out.glob("checkpoints/*/manifest.json")
    assert json.loads(manifest.read_text())["topology"]["balance"] == top.balance


def test_the_trainer_cuts_as_the_config_balance_says():
    from gpipe.train.config import TrainConfig
    from gpipe.train.loop import Trainer

    c = TrainConfig(model_preset="tiny", batch_size=4, seq_len=16, steps=1, balance=[1, 3])
    trainer = Trainer(c)
    try:  # the FLOPs balance of the tiny model is [2, 2]
        assert trainer.balance == [1, 3] and trainer.pipe.balance == [1, 3]
    finally:
        trainer.pipe.close()


def test_a_train_config_balance_of_the_wrong_length_is_refused():
    from gpipe.train.config import TrainConfig

    with pytest.raises(ValueError, match="balance must list 2 positive layer counts"):
        TrainConfig(model_preset="tiny", stages=2, balance=[4])
    with pytest.raises(ValueError, match="balance must list 4 positive layer counts"):
        TrainConfig(model_preset="tiny", stages=2, schedule="interleaved", balance=[2, 2])
