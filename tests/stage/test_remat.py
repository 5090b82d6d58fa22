"""Value checks for ``gpipe.stage.remat`` by itself: the mode names, which micro-batches are
re-materialized, and the thread-local "am I recomputing?" flag (nesting, errors, threads).
They kill the remat mutants the pipe tests let live (docs/mutation.md)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from gpipe.stage.remat import (
    MODES,
    SideEffects,
    check_mode,
    is_recomputing,
    recomputing,
    should_remat,
)


def test_check_mode_normalizes_and_refuses() -> None:
    assert MODES == ("always", "except_last", "never")
    assert [check_mode(m) for m in ("always", "Except-Last", "except_last", "NEVER")] == [
        "always",
        "except_last",
        "except_last",
        "never",
    ]
    with pytest.raises(ValueError) as info:
        check_mode("sometimes")
    assert str(info.value) == (
        "unknown remat mode 'sometimes'; choose one of always, except_last, never"
    )


def test_should_remat_per_mode() -> None:
    assert [should_remat("always", m, 3) for m in range(3)] == [True, True, True]
    assert [should_remat("except_last", m, 3) for m in range(3)] == [True, True, False]
    assert [should_remat("except_last", 0, 1)] == [False]
    assert [should_remat("never", m, 3) for m in range(3)] == [False, False, False]
    assert all(type(should_remat(mode, 0, 2)) is bool for mode in MODES)


def test_recomputing_flag_nests_and_restores() -> None:
    assert is_recomputing() is False
    with recomputing():
        assert is_recomputing() is True
        with recomputing():
            assert is_recomputing() is True
        assert is_recomputing() is True
    assert is_recomputing() is False
    with pytest.raises(KeyError), recomputing():
        raise KeyError("x")
    assert is_recomputing() is False


def test_recomputing_flag_is_per_thread() -> None:
    seen: list[bool] = []
    with recomputing():
        t = threading.Thread(target=lambda: seen.append(is_recomputing()))
        t.start()
        t.join()
        assert is_recomputing() is True
    assert seen == [False]


def test_a_recompute_puts_back_every_batchnorm_it_updated_nested_ones_too() -> None:
    """SideEffects learns, from a watched forward, which modules change their own buffers in
    place (both BatchNorms here, one nested), and puts all of them back after a recompute —
    the statistics a recomputed forward must not count twice."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model = nn.Sequential(nn.BatchNorm1d(4), inner, nn.Tanh())
    effects = SideEffects([model])
    with effects.watch():
        model(torch.randn(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    with effects.undone():
        model(torch.randn(8, 4) * 3 + 1)  # a recompute: moves every running statistic
    after = model.state_dict()
    assert set(before) == {
        f"{p}.{b}"
        for p in ("0", "1.1")
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    model(torch.randn(8, 4) * 3 + 1)  # outside undone the statistics move as usual
    assert not torch.equal(model.state_dict()["1.1.running_mean"], before["1.1.running_mean"])
