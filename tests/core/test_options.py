"""One options object for both pipes, and a distributed pipe's state as explicit objects.

``gpipe.core.options.pipe_options`` checks the options ``gpipe.Pipe`` and
``gpipe.DistributedPipe`` share; a distributed pipe's configuration (``DistConfig``) is built
from it without any collective, and the ranks' fingerprint derives from it. Which device runs a
stage is the schedule's placement alone. (No private access and no import cycle in
``gpipe.dist``: ``test_architecture`` and ``lint-imports`` check every package.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpipe
from gpipe.core import plan
from gpipe.core.options import PipeOptions, pipe_options
from gpipe.dist.config import configure, fingerprint


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())


SHARED = dict(chunks=3, batch_dim=0, remat="always", seed=7, pinned=1, fetch=["1"], timeout=9.0)


def test_pipe_holds_the_options_its_arguments_check_into() -> None:
    pipe = gpipe.Pipe(mlp(), stages=2, schedule="1f1b", **SHARED)
    want = pipe_options(stages=2, schedule="1f1b", default_chunks=1, **SHARED)
    assert isinstance(pipe.options, PipeOptions)
    assert pipe.options == want
    assert pipe.options.fetch == ("1",) and pipe.options.schedule_name == "1f1b"
    assert (pipe.chunks, pipe.remat, pipe.seed, pipe.pinned) == (3, "always", 7, 1)


def test_without_chunks_the_local_pipe_takes_one_and_the_distributed_one_refuses() -> None:
    assert pipe_options(default_chunks=1).chunks == 1
    with pytest.raises(ValueError, match=r"give chunks= \(micro-batches per step\)"):
        pipe_options()


@pytest.mark.parametrize(
    "bad",
    [dict(chunks=0), dict(seed=1.5), dict(remat="sometimes"), dict(fetch="fc"), dict(timeout=0)],
)
def test_the_pipe_refuses_with_the_options_words(bad: dict) -> None:
    kw = dict(dict(chunks=2), **bad)
    with pytest.raises((TypeError, ValueError)) as want:
        pipe_options(**kw)
    with pytest.raises(type(want.value)) as got:
        gpipe.Pipe(mlp(), stages=2, **kw)
    assert str(got.value) == str(want.value)


def _config(**kw):
    opts = pipe_options(chunks=2, schedule=kw.pop("schedule", "gpipe"), seed=kw.pop("seed", 0))
    args = dict(
        rank=1,
        world=2,
        balance=[2, 2],
        data_parallel=None,
        device="cpu",
        tied=(),
        batch="same",
        backend="gloo",
    )
    return configure(mlp(), opts, **dict(args, **kw))


def test_a_distributed_configuration_is_returned_and_needs_no_process_group() -> None:
    config = _config(schedule="zb-v", balance=[1, 1, 1, 1])
    assert (config.layout.num_devices, config.layout.virtual_stages) == (2, 2)
    # the schedule's placement (a V), not stage % K
    assert config.layout.placement == (0, 1, 1, 0)
    assert [config.layout.owner(s) for s in range(4)] == [0, 1, 1, 0]
    assert config.layout.last_device == 0


def test_a_layout_has_no_placement_but_the_schedules() -> None:
    from gpipe.dist.layout import Layout

    with pytest.raises(TypeError, match="placement"):
        Layout(0, 2, 1, 1)  # type: ignore[call-arg]
    assert Layout(0, 2, 1, 2, (0, 1, 1, 0)).last_device == 0


def test_the_fingerprint_derives_from_the_options() -> None:
    a, b = fingerprint(_config(), None), fingerprint(_config(seed=1), None)
    assert {k for k in a if a[k] != b[k]} == {"seed"}
    assert pipe_options(chunks=2).agreed().items() <= a.items()


def test_building_one_devices_stages_needs_the_schedules_placement() -> None:
    named = list(mlp().named_children())
    kw = dict(remat="never", seed=0, fetch_at={}, only_device=1)
    with pytest.raises(ValueError, match="needs the schedule's placement"):
        plan.build_stages(named, [1, 1, 1, 1], 2, lambda s: "cpu", **kw)
    stages = plan.build_stages(
        named, [1, 1, 1, 1], 2, lambda s: "cpu", placement=(0, 1, 1, 0), **kw
    )
    assert [st.index for st in stages] == [1, 2]
